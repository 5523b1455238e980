"""The `dsrl-fast` command line: `train` (the DSRL trainer) and `loss-demo` (the fused loss on CPU)."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsrl-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run the trainer (no arguments: the embedded CPU demo)")
    train.add_argument("--config", default=None, help="YAML config file (default: the embedded demo config)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. algo.switch_step=10 steps=50 model.name_or_path=null")
    demo = sub.add_parser("loss-demo", help="compare the fused policy loss with materialized logits on CPU")
    demo.add_argument("--tokens", type=int, default=2048, help="number of scored tokens N")
    demo.add_argument("--hidden", type=int, default=128, help="hidden size H")
    demo.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    return parser


def _train(config_path: str | None, overrides: list[str]) -> None:
    from dsrl_fast.train.config import load_config
    from dsrl_fast.train.metrics_log import print0
    from dsrl_fast.train.trainer import train

    summary = train(load_config(config_path, overrides))
    print0(f"held-out accuracy: {summary.accuracy_before:.3f} before RL -> {summary.accuracy_after:.3f} after "
           f"{summary.steps} steps ({summary.seconds / 60:.1f} min)")
    print0(f"metrics : {summary.output_dir}/metrics.jsonl")
    if summary.plot_path:
        print0(f"plot    : {summary.plot_path}")
    print0(f"model   : {summary.checkpoint_path} (Hugging Face format)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dsrl-fast` script; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "train":
        _train(args.config, args.overrides)
    else:
        from dsrl_fast.loss_demo import run_loss_demo

        run_loss_demo(n=args.tokens, hidden_size=args.hidden, vocab=args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
