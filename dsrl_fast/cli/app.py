"""The `dsrl-fast` command line: the parser and the dispatcher of its subcommands.

Subcommands: `train` (the DSRL trainer), `eval` (Avg@n / Pass@k tables and plots), `analyze` (the paper's analyses),
`plan` (will a run fit in GPU memory?), `presets` (the shipped run presets), `loss-demo` (the fused loss on CPU).
User errors (a bad config key or value, a missing file, bad data, a refused output directory) print one line and exit
with status 2 before any heavy work; `--debug` shows their traceback. Internal errors keep theirs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn
from importlib.metadata import PackageNotFoundError, version

from dsrl_fast.cli.analyze import add_analyze_parser
from dsrl_fast.cli.eval import add_eval_parser
from dsrl_fast.cli.loss_demo import add_loss_demo_parser
from dsrl_fast.cli.plan import add_plan_parser
from dsrl_fast.cli.presets import add_presets_parser
from dsrl_fast.cli.train import add_train_parser
from dsrl_fast.errors import CheckpointWriteError, RunStopped, UserError

Handler = Callable[[argparse.Namespace], int]


def _version() -> str:
    try:
        return version("dsrl_fast")
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of user errors too")


class _OneLineErrors(argparse.ArgumentParser):
    """An argument parser (subcommands inherit it) whose errors are one line, like the CLI's other user errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="dsrl-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dsrl-fast {_version()}")
    # The deepspeed launcher passes --local_rank=N before the subcommand; it also sets LOCAL_RANK, which is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in (add_train_parser, add_eval_parser, add_analyze_parser, add_plan_parser, add_presets_parser,
                       add_loss_demo_parser):
        add_parser(sub, _add_debug)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse with options and positional overrides in any order (`train a=1 --config x b=2`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        _OneLineErrors(prog=f"dsrl-fast {args.command}").error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dsrl-fast` script; returns the process exit code."""
    args = _parse(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"dsrl-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CheckpointWriteError as exc:
        print(f"dsrl-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dsrl-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:
        stop = _stop_in_chain(exc)
        if stop is None:
            raise
        print(f"dsrl-fast {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code


def _stop_in_chain(exc: BaseException | None) -> RunStopped | None:
    """The RunStopped `exc` is or was raised from.

    An abort can land inside an extension module's initialisation (a lazy import), which re-raises it as
    ``ImportError: initialization failed`` chained to the original.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RunStopped):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None

