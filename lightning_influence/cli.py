"""The ``lightning-influence`` console script.

Subcommands:

``demo``
    Train a small MLP on sklearn's digits with all four callbacks (CurvatureMonitor, InfluenceReport,
    ApproximateCV, PBRFValidation), print the curvature summary and where the TensorBoard logs and
    ``report.html`` are. See :mod:`lightning_influence.demo`.

``report RUN_DIR``
    Rebuild every ``report.html`` under a run directory from its ``report.json``
    (:func:`lightning_influence.reporting.rebuild_reports`).

``fit ...``
    Pass everything after ``fit`` to :class:`lightning.pytorch.cli.LightningCLI` (``fit --config
    configs/digits_all_callbacks.yaml``); needs ``jsonargparse[signatures]`` (the ``cli`` extra).

``influence --ckpt PATH --config YAML [overrides]``
    Re-run the train-end influence stage on a saved checkpoint without training: build the model, data and
    callbacks from the same LightningCLI YAML, restore the checkpoint (weights and callback states, e.g. the
    ``CurvatureMonitor`` history that tunes LiSSA) and run the ``InfluenceReport`` callbacks' own ``on_train_end``
    through a Trainer that stops before its first step. Outputs go to ``--out`` (default
    ``<ckpt dir>/influence-<ckpt name>``): ``influence/report.html``, ``influence_result.pt`` and the score store
    ``influence/store/``, from which the same command resumes when it was interrupted.

Example::

    $ lightning-influence demo --out runs/demo --max-epochs 5
    $ lightning-influence report runs/demo
    $ lightning-influence fit --config configs/digits_all_callbacks.yaml --trainer.max_epochs 3
    $ lightning-influence influence --ckpt runs/cli_digits/.../last.ckpt --config configs/digits_all_callbacks.yaml
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``lightning-influence``.

    Returns:
        The parser, with one subparser per subcommand.

    Example::

        >>> build_parser().parse_args(["demo", "--max-epochs", "3"]).max_epochs
        3
    """
    parser = argparse.ArgumentParser(
        prog="lightning-influence",
        description=(
            "Curvature monitoring and influence functions for PyTorch Lightning. "
            "Run a subcommand with --help for its options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a digits MLP with all four callbacks; print where the logs and report.html are",
        description=(
            "Train a 64-16-10 MLP with an L1 penalty on sklearn's digits with CurvatureMonitor, InfluenceReport, "
            "ApproximateCV and PBRFValidation (TensorBoard logs and <log_dir>/influence/report.html under --out), "
            "print the curvature summary, the CV estimate and the PBRF verdict, and the commands to view them."
        ),
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR", help="log directory (%(default)s)")
    demo.add_argument("--max-epochs", type=_positive_int, default=20, help="training epochs (%(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of split, init, data order and probes (%(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="cheaper train-end stages (2 folds, fewer scored examples, one short PBRF solve)")

    report = sub.add_parser(
        "report",
        help="rebuild report.html from a run directory",
        description="Rebuild every <...>/influence/report.html under RUN_DIR from its report.json.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's log directory (or its influence/)")

    _influence_parser(sub)
    sub.add_parser(
        "fit",
        help="LightningCLI passthrough: lightning-influence fit --config configs/<name>.yaml [overrides]",
        description="Everything after `fit` goes to lightning.pytorch.cli.LightningCLI (subcommand fit).",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-influence`` command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The process exit status: 0 on success, 1 when ``report`` finds no report under ``RUN_DIR``.

    Example::

        >>> import tempfile
        >>> main(["report", tempfile.mkdtemp()])  # an empty directory holds no report.json
        1
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        # From the command line LightningCLI reads sys.argv itself (passing it again makes it warn).
        return _lightning_cli(None if from_command_line else argv)
    if argv[:1] == ["influence"]:
        args, overrides = build_parser().parse_known_args(argv)
        return _influence(args, overrides)
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from lightning_influence.demo import run_demo

        if args.quick:
            run_demo(out_dir=args.out, max_epochs=args.max_epochs, seed=args.seed, max_train=96, num_queries=6,
                     pbrf_train=1, quick=True)
        else:
            run_demo(out_dir=args.out, max_epochs=args.max_epochs, seed=args.seed)
        return 0
    # args.command == "report" (argparse rejects anything else)
    from lightning_influence.reporting import rebuild_reports

    try:
        written = rebuild_reports(args.run_dir)
    except FileNotFoundError as err:
        print(f"lightning-influence report: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"rebuilt {path}")
    return 0


def _lightning_cli(argv: list[str] | None) -> int:
    """Run ``LightningCLI`` on ``argv`` (starting with ``fit``; ``None``: ``sys.argv[1:]``); classes from the config."""
    try:
        from lightning.pytorch.cli import LightningCLI
    except ImportError as err:  # pragma: no cover - jsonargparse missing
        print(f"lightning-influence fit needs jsonargparse[signatures] (pip install 'lightning-influence[cli]'): {err}",
              file=sys.stderr)
        return 2
    LightningCLI(args=argv, subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})
    return 0


def _influence_parser(sub: Any) -> None:
    p = sub.add_parser(
        "influence",
        help="re-run InfluenceReport on a saved checkpoint without training (same LightningCLI YAML)",
        description=(
            "Build the model, data and callbacks from the LightningCLI YAML, restore --ckpt and run the "
            "InfluenceReport callbacks' train-end stage without a training step. Any other argument (e.g. "
            "--trainer.devices 2, --model.init_args.hidden 32) goes to LightningCLI."
        ),
    )
    p.add_argument("--ckpt", type=Path, required=True, metavar="PATH", help="checkpoint written by the fit")
    p.add_argument("--config", type=Path, action="append", required=True, metavar="YAML",
                   help="the LightningCLI config of the fit (repeatable)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output directory (default: <ckpt dir>/influence-<ckpt name>); re-runs resume from its store")
    p.add_argument("--all-callbacks", action="store_true",
                   help="run every lightning_influence callback's train-end stage, not only InfluenceReport's")
    p.add_argument("--no-progress-bar", action="store_true", help="hide the progress bar")


def _influence(args: argparse.Namespace, overrides: list[str]) -> int:
    """``lightning-influence influence``: the train-end stage of the YAML's callbacks on ``args.ckpt``."""
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.cli import LightningCLI
    except ImportError as err:  # pragma: no cover - jsonargparse missing
        print(f"lightning-influence influence needs jsonargparse[signatures] (pip install "
              f"'lightning-influence[cli]'): {err}", file=sys.stderr)
        return 2
    from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
    from lightning_influence.callbacks.influence_report import InfluenceReport

    class StopBeforeTraining(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = True  # on every rank: the fit loop ends before its first step, then on_train_end

    if not args.ckpt.is_file():
        print(f"lightning-influence influence: --ckpt {args.ckpt} is not a file; pass a checkpoint written by the "
              "fit (e.g. <log_dir>/checkpoints/*.ckpt).", file=sys.stderr)
        return 2
    cli_args = [a for c in args.config for a in ("--config", str(c))] + list(overrides)
    cli = LightningCLI(args=cli_args, run=False, subclass_mode_model=True, subclass_mode_data=True,
                       save_config_callback=None)
    keep = (pl.Callback,) if args.all_callbacks else (InfluenceReport, CurvatureMonitor)
    callbacks = [cb for cb in getattr(cli.trainer, "callbacks", [])
                 if isinstance(cb, keep) and type(cb).__module__.startswith("lightning_influence.")]
    if not any(isinstance(cb, InfluenceReport) for cb in callbacks):
        print(f"lightning-influence influence: the config ({', '.join(map(str, args.config))}) has no "
              "lightning_influence.InfluenceReport in trainer.callbacks; add one.", file=sys.stderr)
        return 2
    t = cli.config.get("trainer", {})
    strategy = t.get("strategy", "auto")
    out = args.out or args.ckpt.parent / f"influence-{args.ckpt.stem}"
    trainer = pl.Trainer(
        accelerator=t.get("accelerator") or "auto", devices=t.get("devices") or "auto",
        strategy=strategy if isinstance(strategy, str) else "auto", num_nodes=t.get("num_nodes") or 1,
        precision=t.get("precision"), callbacks=[*callbacks, StopBeforeTraining()], logger=False,
        default_root_dir=out, enable_checkpointing=False, num_sanity_val_steps=0, max_epochs=-1, max_steps=-1,
        enable_model_summary=False, enable_progress_bar=not args.no_progress_bar,
    )
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(args.ckpt))
    if trainer.is_global_zero:
        for cb in callbacks:
            if isinstance(cb, InfluenceReport) and cb.scores_path is not None:
                print(f"{type(cb).__name__}: {cb.scores_path.parent / 'report.html'}")
        for name, value in sorted(trainer.callback_metrics.items()):
            if name.startswith("influence/"):
                print(f"{name} = {float(value):.6g}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _version() -> str:
    from lightning_influence import __version__

    return __version__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
