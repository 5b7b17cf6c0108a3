"""Command line: ``python -m pyro_mogflow demo [--steps N] [--seed S] [--device D] [--out DIR]``.

Run ``python -m pyro_mogflow --help`` for the list of commands, and
``python -m pyro_mogflow demo --help`` for the demo's options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer ``>= minimum``, else an error saying ``what`` is allowed."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _seed(text: str) -> int:
    """An argparse type: a seed numpy accepts, ``0 <= seed < 2**32 - 1`` (the demo uses seed
    and seed + 1)."""
    from ._validation import MAX_SEED

    value = _nonnegative_int(text)
    if value > MAX_SEED - 1:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED - 1}], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subcommand per job (``demo``)."""
    from .examples import demo

    parser = argparse.ArgumentParser(
        prog="python -m pyro_mogflow",
        description="pyro_mogflow: normalizing-flow guides for Pyro on a learnable mixture of "
        "diagonal Gaussians, for posteriors with several modes.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "demo",
        help="fit AutoNormal and AutoMixtureFlow to a model with a two-mode posterior",
        description="Fit a regression whose likelihood cannot tell the sign of its slope "
        "(y ~ N(|theta| x, sigma), a two-mode posterior with known evidence) with Pyro's "
        "AutoNormal and with AutoMixtureFlow. Prints a table (mass near each mode, modes found, "
        "ELBO, KL to the exact posterior, fit time) and saves posteriors.png and results.json "
        "in --out.",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=demo.DEFAULT_STEPS,
        help=f"SVI steps per guide (default {demo.DEFAULT_STEPS})",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=demo.DEFAULT_SEED,
        help=f"seed of the data and of the fits (default {demo.DEFAULT_SEED})",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model and the guides run (default cpu)",
    )
    p.add_argument(
        "--out",
        default=demo.DEFAULT_OUT,
        help=f"output folder for posteriors.png and results.json (default ./{demo.DEFAULT_OUT})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(command_parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pyro_mogflow`` and of the ``pyro-mogflow`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        import torch

        from .examples.demo import _check_out, run_demo

        if args.device == "cuda" and not torch.cuda.is_available():
            args.command_parser.error(
                "argument --device: cuda was asked for, but CUDA is not available on this "
                "machine (torch.cuda.is_available() is False); use --device cpu"
            )
        try:
            _check_out(args.out)
        except ValueError as e:
            args.command_parser.error(f"argument --out: {e}")
        try:
            run_demo(
                steps=args.steps,
                seed=args.seed,
                device=args.device,
                out=args.out,
                progress=not args.no_progress,
            )
        except KeyboardInterrupt as e:
            # one line, not a traceback; what was finished has been written by run_demo
            print(
                f"\n{e}" if str(e) else "\ninterrupted before any guide was fitted; nothing saved",
                file=sys.stderr,
            )
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
