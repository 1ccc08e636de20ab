"""Two CPU processes with ``strategy="ddp"``: CurvatureMonitor and InfluenceReport shard their work across ranks.

Lightning's ``ddp`` strategy launches the second process by re-running this script (``sys.argv``), so it must be
run as a script, not from a notebook (use ``ddp_spawn``/``ddp_notebook`` there). Each rank measures curvature and
streams training gradients on its own shard (``trainer.distributed_sampler_kwargs``) with one sum-reduction per
curvature product; every rank ends with the same numbers, and rank 0 logs and writes the report.

Run::

    python examples/ddp_cpu.py                       # 2 processes, gloo, about a minute
    python examples/ddp_cpu.py --max-epochs 1 --max-train 64 --out /tmp/ddp   # smoke-test size

It prints, on rank 0, the last curvature summary and the report path, and writes ``<out>/ddp_result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.demo import DigitsClassifier, DigitsDataModule
from lightning_influence.tasks import Classification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--max-train", type=int, default=256)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", default="runs/ddp_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on a small machine: one thread each
    L.seed_everything(0, workers=True, verbose=False)
    task = Classification()
    monitor = CurvatureMonitor(task, every_n_epochs=1, on_checkpoint=False, sample_size=256)
    report = InfluenceReport(task, query_data="val", solver="cg", damping=1e-2, max_queries=8, top_k=3,
                             max_train=args.max_train, self_influence=False, images=True, progress_bar=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp", max_epochs=args.max_epochs,
        logger=TensorBoardLogger(args.out), callbacks=[monitor, report], enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=5,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(DigitsClassifier(l1=0.0), datamodule=DigitsDataModule(batch_size=32))
    summary = monitor.latest
    assert summary is not None and report.result is not None
    out = {"rank": trainer.global_rank, "world_size": trainer.world_size, "trace": summary.trace,
           "lambda_max": summary.lambda_max, "score_abs_mean": float(report.result.scores.abs().mean()),
           "report": str(Path(trainer.log_dir or args.out) / "influence" / "report.html")}
    # every rank computed the same numbers; each writes its own file so a test can compare them
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"ddp_result_rank{trainer.global_rank}.json").write_text(json.dumps(out, indent=2))
    if trainer.is_global_zero:
        print(f"world size {trainer.world_size} (pid {os.getpid()}): trace {summary.trace:.4g}, "
              f"lambda_max {summary.lambda_max:.4g}; report {out['report']}")
    # Lightning leaves the gloo process group alive; destroying it here joins gloo's threads before the interpreter
    # exits (otherwise an exit can abort with "terminate called without an active exception", status -6).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
