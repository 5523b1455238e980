"""The `dsrl-fast eval` subcommand: argument parsing and the printed summary (the work is in runner.py)."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from pathlib import Path

from dsrl_fast.errors import RunStopped, UserError
from dsrl_fast.interrupt import StopRequest

__all__ = ["EvalInterrupted", "add_eval_parser"]


class EvalInterrupted(RunStopped):
    """`dsrl-fast eval` stopped by SIGINT/SIGTERM (exit status 128 + its number); every finished batch is cached."""

    def __init__(self, signum: int, output_dir: str):
        super().__init__(signum, f"stopped by {signal.Signals(signum).name}: the problems finished so far are cached "
                                 f"in {Path(output_dir) / 'generations'}; the same command continues from them")

_EPILOG = """data: benchmark names (math500, aime24, aime25, amc23, minerva_math, olympiadbench; read from
  <data_dir>/benchmarks/<name>/test.jsonl), toy (the embedded task's held-out problems), a .jsonl/.parquet file,
  hf:<dataset>[:<split>], or label=<file | hf:...> (a benchmark label gives its fields).
options (key=value): n, ks, temperature, top_p, max_new_tokens (default 8192, the paper's), seed, engine
  (auto|hf|vllm), dtype, template, add_special_tokens, reward (the scorer; default hendrycks_math, the authors' string
  check; math_verify accepts more forms), limit, batch_size, data_dir, problem_key, answer_key, answer_mode, toy_seed,
  toy_train_size, toy_eval_size, gpu_memory_utilization, cpu_kv_cache_gib, max_model_len, progress.
Every table names its scorer, length cap, n, temperature and top_p: compare tables only where they agree.
generations/<model>/<benchmark>.jsonl caches each finished batch, keyed by the model files' content: SIGINT/SIGTERM
  stop the command at once, and the same command continues; new weights at the same path are generated again.
example: dsrl-fast eval --model base=Qwen/Qwen3-4B --model runs/dsrl/checkpoints/step_000200/hf \\
  --data math500,aime24 --n 32 --k 1,2,4,...,32 --output eval_out data_dir=../shared/data"""


def add_eval_parser(sub: argparse._SubParsersAction,
                    add_debug: Callable[[argparse.ArgumentParser, object], None]) -> None:
    """Register `eval` on the `dsrl-fast` subparsers (`add_debug` adds the shared --debug flag)."""
    p = sub.add_parser("eval", help="Avg@n, Pass@k and maj@k of models on benchmarks (tables, plot, generations)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
                       description="Sample n responses per problem with the paper's settings (temperature 1.0, "
                                   "top_p 1.0, up to 8192 new tokens, the training template), score them with the "
                                   "authors' Hendrycks MATH check and report Avg@n, the unbiased Pass@k for every "
                                   "k <= n, maj@k and the thought taxonomy per model and benchmark.")
    p.add_argument("--model", action="append", default=[], metavar="[LABEL=]PATH",
                   help="a model directory or hub id (repeat for several; the first is the base of the ratios)")
    p.add_argument("--data", default=None, metavar="SPEC[,SPEC...]", help="benchmarks or files (see below)")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default 32)")
    p.add_argument("--k", default=None, metavar="K,K,...", help="k values, e.g. 1,2,4,...,256 (default: powers of 2)")
    p.add_argument("--output", default="eval_results", help="output directory (default: eval_results)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="options (see below)")
    add_debug(p, argparse.SUPPRESS)
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    # Installed first, as in training: SIGINT/SIGTERM stop the command at once (a cache write ends first), also when
    # the shell started it in the background with SIGINT ignored.
    with StopRequest(stop_now=lambda signum: EvalInterrupted(signum, args.output)) as stop:
        return _eval_under(args, stop)


def _eval_under(args: argparse.Namespace, stop: StopRequest) -> int:
    from dsrl_fast.eval.benchmarks import parse_data_specs
    from dsrl_fast.eval.cache import CacheMismatch
    from dsrl_fast.eval.config import parse_ks, parse_overrides
    from dsrl_fast.eval.models import parse_model_specs
    from dsrl_fast.eval.runner import load_eval_sets, run_eval
    from dsrl_fast.reward import check_reward_spec

    try:
        if args.data is None:
            raise ValueError("--data is required (e.g. --data math500,aime24 or --data toy)")
        base: dict[str, object] = {}
        if args.n is not None:
            base["n"] = args.n
        if args.k is not None:
            base["ks"] = parse_ks(args.k)
        cfg = parse_overrides(args.overrides, base)
        models = parse_model_specs(args.model)
        sets = load_eval_sets(parse_data_specs(args.data), cfg)
        check_reward_spec(cfg.reward, load=True)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        raise UserError(str(exc)) from exc
    try:
        outputs = run_eval(models, sets, cfg, args.output, stop=stop)
    except CacheMismatch as exc:
        raise UserError(str(exc)) from exc
    print(Path(outputs.tables["markdown"]).read_text(encoding="utf-8").rstrip())
    print(f"tables : {outputs.tables['markdown']}, {outputs.tables['csv']}, {outputs.tables['json']}")
    print(f"plot   : {outputs.plot}")
    print(f"outputs: {outputs.output_dir}/generations (responses), {outputs.output_dir}/problems (correct counts)")
    return 0
