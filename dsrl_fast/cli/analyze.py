"""The `dsrl-fast analyze` subcommand: `alignment` (gradients of the two spaces) and `behaviours` (LLM judge)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dsrl_fast.errors import UserError

__all__ = ["add_analyze_parser"]

_ALIGNMENT_EPILOG = """options (key=value) as for `dsrl-fast eval` (n, limit, temperature, max_new_tokens, engine, dtype,
  template, data_dir, ...), plus the analysis's own --impl and --marginal-prefix.
example (the paper: 400 AMC23 rollouts = 40 problems x 10): dsrl-fast analyze alignment --model Qwen/Qwen3-4B \\
  --data amc23 --n 10 --output align_out data_dir=../shared/data"""

_BEHAVIOURS_EPILOG = """options (key=value) as for `dsrl-fast eval`; for the judge: temperature (default 0: greedy),
  max_new_tokens (default 512), template (default chat), limit (responses per model and benchmark).
example: dsrl-fast analyze behaviours --judge Qwen/Qwen3-8B --generations eval_out --output judge_out limit=200"""


def add_analyze_parser(sub: argparse._SubParsersAction,
                       add_debug: Callable[[argparse.ArgumentParser, object], None]) -> None:
    """Register `analyze alignment` and `analyze behaviours` on the `dsrl-fast` subparsers."""
    analyze = sub.add_parser("analyze", help="the paper's analyses: gradient alignment, LLM-judged behaviours")
    add_debug(analyze, argparse.SUPPRESS)
    kinds = analyze.add_subparsers(dest="analysis", required=True)

    align = kinds.add_parser("alignment", formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=_ALIGNMENT_EPILOG,
                             help="per rollout: dot product and cosine of ∇log P(y) and ∇log P(y|x), per-token gaps",
                             description="Sample rollouts of a model on a benchmark, then per rollout the dot "
                                         "product and cosine similarity of ∇θ log P(y) and ∇θ log P(y|x) over all "
                                         "parameters and the per-token log P(y|x) − log P(y) (the paper's Fig. 2).")
    align.add_argument("--model", required=True, metavar="[LABEL=]PATH", help="a model directory or hub id")
    align.add_argument("--data", required=True, metavar="SPEC", help="one benchmark or file (as for eval)")
    align.add_argument("--n", type=int, default=10, help="rollouts per problem (default 10)")
    align.add_argument("--impl", default="auto", choices=("auto", "triton", "torch"), help="fused log-prob kernel")
    align.add_argument("--marginal-prefix", default=None, metavar="ID[,ID...]",
                       help="token ids of the marginal context (default: <|im_start|>, else BOS)")
    align.add_argument("--output", default="alignment_results", help="output directory")
    align.add_argument("overrides", nargs="*", metavar="key=value", help="options (see below)")
    add_debug(align, argparse.SUPPRESS)
    align.set_defaults(handler=_alignment)

    judge = kinds.add_parser("behaviours", aliases=["behaviors"], formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=_BEHAVIOURS_EPILOG,
                             help="a local judge labels backtracking / verification / subgoal setting / enumeration",
                             description="Label each response of a `dsrl-fast eval` run with the paper's judge "
                                         "prompt and report the share of responses showing each behaviour.")
    judge.add_argument("--judge", required=True, metavar="[LABEL=]PATH", help="the judge model (directory or hub id)")
    judge.add_argument("--generations", required=True, metavar="EVAL_DIR",
                       help="the --output directory of a `dsrl-fast eval` run")
    judge.add_argument("--output", default="behaviour_results", help="output directory")
    judge.add_argument("overrides", nargs="*", metavar="key=value", help="options (see below)")
    add_debug(judge, argparse.SUPPRESS)
    judge.set_defaults(handler=_behaviours)


def _prefix(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ids = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise ValueError(f"--marginal-prefix must be comma-separated token ids, got {text!r}") from exc
    if not ids or min(ids) < 0:
        raise ValueError(f"--marginal-prefix must hold non-negative token ids, got {text!r}")
    return ids


def _alignment(args: argparse.Namespace) -> int:
    from dsrl_fast.analysis.run_alignment import run_alignment
    from dsrl_fast.eval.benchmarks import parse_data_specs
    from dsrl_fast.eval.config import parse_overrides
    from dsrl_fast.eval.models import parse_model_specs
    from dsrl_fast.eval.runner import load_eval_sets

    try:
        cfg = parse_overrides(args.overrides, {"n": args.n})
        (model,) = parse_model_specs([args.model])
        specs = parse_data_specs(args.data)
        if len(specs) != 1:
            raise ValueError(f"--data must name one benchmark or file for alignment, got {args.data!r}")
        (eval_set,) = load_eval_sets(specs, cfg)
        prefix = _prefix(args.marginal_prefix)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        raise UserError(str(exc)) from exc
    out = run_alignment(model, eval_set, cfg, args.output, impl=args.impl, marginal_prefix=prefix)
    s = out.summary
    print(f"{int(s['rollouts'])} rollouts of {model.label} on {eval_set.label}: "
          f"{100 * s['nonnegative_dot_share']:.1f}% non-negative dot products, mean dot {s['dot_mean']:.4g} "
          f"(median {s['dot_median']:.4g}), mean cosine {s['cosine_mean']:.3f}; "
          f"log P(y|x) - log P(y) per token: mean {s['token_diff_mean']:.3f}, std {s['token_diff_std']:.3f}")
    print(f"numbers: {out.json_path}")
    print(f"plot   : {out.plot_path}")
    return 0


def _behaviours(args: argparse.Namespace) -> int:
    from dsrl_fast.analysis.run_behaviours import find_generations, run_behaviours
    from dsrl_fast.eval.config import parse_overrides
    from dsrl_fast.eval.models import parse_model_specs

    try:
        cfg = parse_overrides(args.overrides, {"n": 1, "temperature": 0.0, "max_new_tokens": 512})
        (judge,) = parse_model_specs([args.judge])
        find_generations(args.generations)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    out = run_behaviours(judge, args.generations, cfg, args.output)
    print(Path(out.markdown_path).read_text(encoding="utf-8").rstrip())
    print(f"tables : {out.markdown_path}, {out.csv_path}, {out.json_path}")
    return 0
