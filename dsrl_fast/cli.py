"""The `dsrl-fast` command line."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsrl-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("loss-demo", help="compare the fused policy loss with materialized logits on CPU")
    demo.add_argument("--tokens", type=int, default=2048, help="number of scored tokens N")
    demo.add_argument("--hidden", type=int, default=128, help="hidden size H")
    demo.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dsrl-fast` script; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "loss-demo":
        from dsrl_fast.loss_demo import run_loss_demo

        run_loss_demo(n=args.tokens, hidden_size=args.hidden, vocab=args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
