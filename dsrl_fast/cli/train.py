"""`dsrl-fast train`: parse the run's config (file, preset, overrides) and run the trainer."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dsrl_fast.errors import UserError

# Stands in for a missing data.train_path while --print-config resolves the rest (nothing is read).
_PRINT_PLACEHOLDER = "print-config-reads-no-data.jsonl"


def add_train_parser(sub: argparse._SubParsersAction,
                     add_debug: Callable[[argparse.ArgumentParser, object], None]) -> None:
    """The `train` subcommand: run the trainer on the embedded demo, a YAML file or a preset, with overrides."""
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
    add_debug(train, argparse.SUPPRESS)
    train.set_defaults(handler=_train)


def _load_train_config(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> object:
    from dsrl_fast.planning.auto import resolve_auto_micro_batch
    from dsrl_fast.train.config import load_config, preset_path

    try:
        path = preset_path(args.preset) if args.preset else args.config
        return load_config(path, [*extra, *resolve_auto_micro_batch(args.preset, args.config, args.overrides)])
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc


def _print_config(args: argparse.Namespace) -> None:
    """Print the resolved config as YAML. A config that names a model but no data.train_path (a preset as shipped)
    prints with data.train_path: null under a comment saying that training needs it; training itself still refuses
    such a config."""
    import yaml

    from dsrl_fast.train.config import config_to_dict

    note = ""
    try:
        cfg = _load_train_config(args)
    except UserError as exc:
        if "data.train_path is required" not in str(exc):
            raise
        cfg = _load_train_config(args, (f"data.train_path={_PRINT_PLACEHOLDER}",))
        note = ("# data.train_path is null: `train` needs it (data.train_path=<file.jsonl | file.parquet | "
                "hf:<dataset>[:<split>]>)\n")
    data = config_to_dict(cfg)
    if note:
        data["data"]["train_path"] = None
    print(note + yaml.safe_dump(data, sort_keys=False), end="")


def _train(args: argparse.Namespace) -> int:
    from dsrl_fast.train.metrics_log import print0
    from dsrl_fast.train.run_report import pass_at_k_table
    from dsrl_fast.train.trainer import train

    if args.print_config:
        _print_config(args)
        return 0
    cfg = _load_train_config(args)
    summary = train(cfg)

    def show(accuracy: float | None) -> str:
        return "n/a" if accuracy is None else f"{accuracy:.3f}"

    print0(f"held-out accuracy: {show(summary.accuracy_before)} before RL -> {show(summary.accuracy_after)} after "
           f"{summary.steps} steps ({summary.seconds / 60:.1f} min)")
    for line in pass_at_k_table(summary.eval_before, summary.eval_after):
        print0(line)
    print0(f"metrics : {summary.output_dir}/metrics.jsonl")
    print0(f"samples : {summary.output_dir}/samples.jsonl")
    if summary.plot_path:
        print0(f"plot    : {summary.plot_path}")
    print0(f"summary : {summary.output_dir}/summary.json")
    print0(f"model   : {summary.checkpoint_path} (Hugging Face format)")
    return 0
