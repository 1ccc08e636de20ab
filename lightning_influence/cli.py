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

Example::

    $ lightning-influence demo --out runs/demo --max-epochs 5
    $ lightning-influence report runs/demo
    $ lightning-influence fit --config configs/digits_all_callbacks.yaml --trainer.max_epochs 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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
