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
from dsrl_fast.errors import CheckpointWriteError, RunStopped, UserError
from dsrl_fast.cli.eval import add_eval_parser
from dsrl_fast.cli.plan import add_plan_parser

Handler = Callable[[argparse.Namespace], int]


def _version() -> str:
    try:
        return version("dsrl_fast")
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of user errors too")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from dsrl_fast.train.config import config_help

    train = sub.add_parser(
        "train", help="run the trainer (no arguments: the embedded CPU demo)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run DSRL (or another algorithm) on a config: the embedded toy demo by default, the paper's "
                    "setup when model.name_or_path is set, a YAML file (--config) or a shipped preset (--preset). "
                    "key=value overrides apply left to right; options and overrides may come in any order.",
        epilog="config keys (dotted; the defaults shown are the paper's setup, the toy demo overrides some):\n"
               + config_help())
    source = train.add_mutually_exclusive_group()
    source.add_argument("--config", default=None, help="YAML config file")
    source.add_argument("--preset", default=None, help="a shipped preset (see `dsrl-fast presets`)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. algo.switch_step=10 steps=50 model.name_or_path=null")
    _add_debug(train, argparse.SUPPRESS)
    train.set_defaults(handler=_train)


def _load_train_config(args: argparse.Namespace) -> object:
    from dsrl_fast.planning.auto import resolve_auto_micro_batch
    from dsrl_fast.train.config import load_config, preset_path

    try:
        path = preset_path(args.preset) if args.preset else args.config
        return load_config(path, resolve_auto_micro_batch(args.preset, args.config, args.overrides))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc


def _train(args: argparse.Namespace) -> int:
    import yaml

    from dsrl_fast.train.config import config_to_dict
    from dsrl_fast.train.metrics_log import print0
    from dsrl_fast.train.trainer import train

    cfg = _load_train_config(args)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    summary = train(cfg)

    def show(accuracy: float | None) -> str:
        return "n/a" if accuracy is None else f"{accuracy:.3f}"

    print0(f"held-out accuracy: {show(summary.accuracy_before)} before RL -> {show(summary.accuracy_after)} after "
           f"{summary.steps} steps ({summary.seconds / 60:.1f} min)")
    print0(f"metrics : {summary.output_dir}/metrics.jsonl")
    print0(f"samples : {summary.output_dir}/samples.jsonl")
    if summary.plot_path:
        print0(f"plot    : {summary.plot_path}")
    print0(f"summary : {summary.output_dir}/summary.json")
    print0(f"model   : {summary.checkpoint_path} (Hugging Face format)")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dsrl_fast.train.config import list_presets, preset_path

    del args
    for name in list_presets():
        first = Path(preset_path(name)).read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        print(f"{name:<20} {first}")
    print("use: dsrl-fast train --preset NAME data.train_path=... [key=value ...]")
    return 0


def _loss_demo(args: argparse.Namespace) -> int:
    from dsrl_fast.cli.loss_demo import run_loss_demo

    run_loss_demo(n=args.tokens, hidden_size=args.hidden, vocab=args.vocab)
    return 0


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
    _train_parser(sub)
    add_eval_parser(sub, _add_debug)
    add_analyze_parser(sub, _add_debug)
    add_plan_parser(sub, _add_debug)
    presets = sub.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(handler=_presets)
    _add_debug(presets, argparse.SUPPRESS)
    demo = sub.add_parser("loss-demo", help="compare the fused policy loss with materialized logits on CPU")
    demo.add_argument("--tokens", type=int, default=2048, help="number of scored tokens N")
    demo.add_argument("--hidden", type=int, default=128, help="hidden size H")
    demo.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    _add_debug(demo, argparse.SUPPRESS)
    demo.set_defaults(handler=_loss_demo)
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

