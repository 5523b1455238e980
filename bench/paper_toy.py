"""The paper's claims in miniature: GRPO, DSRL, NSR-/PSR-PreRL and NSR-/PSR-RL on the self-correcting sums toy.

    python -m bench.paper_toy --out bench/results/paper_toy          # the default run (5 seeds)
    python -m bench.paper_toy --out /tmp/pt --seeds 2 --steps 20      # a quicker look

What it does, in order (each stage is skipped when its output already exists in --out, so an interrupted run
loses at most the run in progress; --out refuses results made with other options):

1. One supervised warm-up, shared by every run: the embedded 2-layer Qwen3 trained on the traces of
   `dsrl_fast.data.toy_corrections` ("Compute a+b+c.": two steps, some corrected with "Wait, ..." or
   "Alternatively, ..."), saved as a Hugging Face model (--out/warmup/model) with the training and held-out
   problems as JSONL (--out/warmup/*.jsonl).
2. The RL runs: every algorithm of --algos for --seeds seeds, plus DSRL at each switch step of --switch-steps.
   Each is the trainer end to end (`dsrl_fast.train.train`) started from the warm-up model
   (model.name_or_path=--out/warmup/model, data.train_path=--out/warmup/train.jsonl): same model, same problems,
   the seed sets the data order and the sampling. DSRL with S=0 runs GRPO from step 0 and DSRL at --dsrl-switch
   is the main DSRL run, so those sweep points reuse the GRPO and DSRL runs.
3. Every final model (and the warm-up model, "base") answers each held-out problem --eval-n times at temperature
   1: Avg@n and the unbiased Pass@k for every k = 1..n, and the thought-taxonomy shares of the answers.
4. --out/results.md (table with 95% confidence intervals, Student t over seeds; the claims' verdicts),
   --out/results.json, --out/runs/<run>.json (each run's per-step curves and per-problem counts) and the plots
   reward_curves.png, pass_at_k.png, thought_shares.png, switch_sweep.png. Each invocation's wall time is appended
   to --out/invocations.jsonl; the report gives their sum.

The learning rates are the embedded demo's (DESIGN §5): conditional steps at --lr, marginal (PreRL) steps at
--marginal-lr, loss coefficient 1. One progress line per run goes to stderr; each trainer's own output goes to
--out/work/<run>.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.paper_toy_report import write_report  # noqa: E402
from bench.toy_splits import TEMPLATE, write_splits  # noqa: E402

ALGOS = ("grpo", "dsrl", "nsr_prerl", "psr_prerl", "nsr_rl", "psr_rl")
# Options that define the results; --out refuses to mix results made with different values.
DEFINING = ("steps", "prompts", "rollouts", "lr", "marginal_lr", "dsrl_switch", "sft_steps", "sft_batch", "sft_lr",
            "sft_marginal_share", "train_size", "eval_size", "eval_n", "low", "high", "max_response_len", "data_seed")


@dataclass(frozen=True)
class RunSpec:
    """One RL run: algorithm, DSRL switch step (None for the others) and seed."""

    algo: str
    switch: int | None
    seed: int

    @property
    def name(self) -> str:
        return f"{self.algo if self.switch is None else f'dsrl_S{self.switch}'}-seed{self.seed}"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative ints, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and every option's default."""

    parser = argparse.ArgumentParser(prog="python -m bench.paper_toy", description=__doc__, formatter_class=Formatter)
    add = parser.add_argument
    add("--out", type=Path, required=True, help="output directory (resumed when it holds an earlier run)")
    add("--seeds", type=int, default=5, help="seeds per algorithm and switch step (>= 2 for intervals)")
    add("--steps", type=int, default=60, help="RL steps of every run (> the largest switch step)")
    add("--algos", default=",".join(ALGOS), help=f"comma-separated subset of {','.join(ALGOS)}")
    add("--switch-steps", type=_int_list, default=[0, 5, 10, 20, 40], help="DSRL switch steps S of the sweep")
    add("--dsrl-switch", type=int, default=10, help="switch step of the main DSRL run")
    add("--prompts", type=int, default=8, help="prompts per RL step")
    add("--rollouts", type=int, default=8, help="rollouts per prompt (the group size)")
    add("--lr", type=float, default=1e-4, help="learning rate of conditional steps (GRPO, NSR-RL, PSR-RL)")
    add("--marginal-lr", type=float, default=1e-5, help="learning rate of marginal steps (NSR-/PSR-PreRL, DSRL's)")
    add("--sft-steps", type=int, default=300, help="supervised warm-up steps (the shared starting model)")
    add("--sft-batch", type=int, default=128, help="problems per warm-up step")
    add("--sft-lr", type=float, default=3e-3, help="warm-up learning rate")
    add("--sft-marginal-share", type=float, default=0.5,
        help="share of warm-up rows trained without their prompt (<|im_start|> + trace): the toy's pre-training of "
        "the marginal space PreRL optimizes (0: prompted rows only, a marginal space never trained)")
    add("--train-size", type=int, default=3000, help="training problems")
    add("--eval-size", type=int, default=100, help="held-out problems")
    add("--eval-n", type=int, default=32, help="answers per held-out problem (Avg@n, Pass@k for k <= n)")
    add("--low", type=int, default=10, help="smallest operand")
    add("--high", type=int, default=49, help="largest operand")
    add("--max-response-len", type=int, default=48, help="response cap in tokens (prompt + cap <= 64 positions)")
    add("--data-seed", type=int, default=0, help="seed of the problems and of the warm-up")
    add("--jobs", type=int, default=os.cpu_count() or 1,
        help="runs in parallel (processes of --threads threads each; default: this machine's cores)")
    add("--threads", type=int, default=1, help="torch threads per process (0: torch's default; 1 is fastest for "
        "this tiny model, above all on a shared machine)")
    args = parser.parse_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    if not algos or set(algos) - set(ALGOS):
        parser.error(f"--algos must name algorithms from {','.join(ALGOS)}, got {args.algos!r}")
    args.algos = [a for a in ALGOS if a in algos]
    for name in ("seeds", "steps", "prompts", "rollouts", "sft_steps", "sft_batch", "train_size", "eval_size",
                 "eval_n", "jobs", "max_response_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if max(args.switch_steps + [args.dsrl_switch]) >= args.steps:
        parser.error(f"--steps must exceed every switch step (largest {max(args.switch_steps + [args.dsrl_switch])}),"
                     f" got {args.steps}")
    if min(args.lr, args.marginal_lr, args.sft_lr) <= 0:
        parser.error("--lr, --marginal-lr and --sft-lr must be > 0")
    if not 0 <= args.sft_marginal_share <= 1:
        parser.error(f"--sft-marginal-share must be in [0, 1], got {args.sft_marginal_share}")
    if not 0 <= args.low <= args.high:
        parser.error(f"--low and --high must satisfy 0 <= low <= high, got {args.low} and {args.high}")
    if args.train_size + args.eval_size > (args.high - args.low + 1) ** 3:
        parser.error(f"--train-size + --eval-size must be <= {(args.high - args.low + 1) ** 3} (distinct triples)")
    if 14 + args.max_response_len > 64:
        parser.error(f"--max-response-len must be <= 50 (the toy model has 64 positions), got {args.max_response_len}")
    return args


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """Every run to make: the algorithms, then the sweep's extra DSRL switch steps (S=0 is GRPO, S=--dsrl-switch
    the main DSRL run)."""
    specs = [RunSpec(a, None, s) for a in args.algos for s in range(args.seeds)]
    extra = [S for S in args.switch_steps if S != args.dsrl_switch and S != 0]
    return specs + [RunSpec("dsrl", S, s) for S in extra for s in range(args.seeds)]


def _set_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def prepare_warmup(args: argparse.Namespace) -> Path:
    """The shared warm-up model and the problem files in --out/warmup (made once)."""
    from dsrl_fast.model.tiny import build_tiny_qwen3, save_tiny_model
    from dsrl_fast.train.sections import SFTConfig
    from dsrl_fast.train.warmup import supervised_warmup
    from dsrl_fast.data.toy_corrections import build_corrections_tokenizer, correction_target, make_correction_problems

    root = args.out / "warmup"
    if (root / "model" / "config.json").is_file():
        return root
    started = time.perf_counter()
    problems = make_correction_problems(args.train_size + args.eval_size, seed=args.data_seed, low=args.low,
                                        high=args.high)
    write_splits(root, problems, args.train_size)
    tokenizer = build_corrections_tokenizer()
    model = build_tiny_qwen3(len(tokenizer), seed=args.data_seed, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sft = SFTConfig(steps=args.sft_steps, batch_size=args.sft_batch, lr=args.sft_lr)
    losses = supervised_warmup(model, tokenizer, problems[:args.train_size], sft, seed=args.data_seed,
                               target=correction_target, marginal_share=args.sft_marginal_share).losses
    save_tiny_model(model, tokenizer, root / "model.partial")
    (root / "model.partial").rename(root / "model")  # complete or absent: a kill cannot leave half a model
    print(f"warm-up: {args.sft_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return root


def _overrides(args: argparse.Namespace, spec: RunSpec, warmup: Path, out: Path) -> list[str]:
    switch = args.dsrl_switch if spec.switch is None else spec.switch
    return [
        f"model.name_or_path={warmup / 'model'}", "model.gradient_checkpointing=false", "model.dtype=float32",
        f"data.train_path={warmup / 'train.jsonl'}", f"data.template={TEMPLATE}", "data.max_prompt_len=16",
        "rollout.engine=hf", f"rollout.n={args.rollouts}", f"rollout.max_response_len={args.max_response_len}",
        f"algo.algo={spec.algo}", f"algo.switch_step={switch}", "algo.pretrain_loss_coef=1.0",
        f"optim.lr={args.lr}", f"optim.marginal_lr={args.marginal_lr}", "optim.weight_decay=0.0",
        "optim.max_tokens_per_micro_batch=4096", "deepspeed.enabled=false",
        f"steps={args.steps}", "epochs=null", f"prompts_per_step={args.prompts}", f"seed={spec.seed}",
        f"output_dir={out}", "overwrite=true", "checkpoint_every=0", "keep_checkpoints=1", "progress=false",
        "log_samples=0", "eval_every=0", "reward=hendrycks_math",
    ]


def evaluate_model(model_dir: Path, eval_path: Path, n: int, max_response_len: int, seed: int) -> dict[str, Any]:
    """n answers at temperature 1 to every held-out problem: per-problem correct counts, Avg@n, Pass@k for
    k = 1..n, thought-taxonomy counts and mean response length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsrl_fast.eval.thoughts import count_thoughts
    from dsrl_fast.data.problems import load_problems
    from dsrl_fast.eval.pass_at_k import pass_at_k_curve
    from dsrl_fast.reward import get_reward_fn
    from dsrl_fast.rollout.base import SamplingConfig
    from dsrl_fast.rollout.hf_engine import HFEngine
    from dsrl_fast.data.templates import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    problems = load_problems(eval_path, "problem", "answer")
    prompts = [tokenizer(render_prompt(p.prompt_text, TEMPLATE), add_special_tokens=False)["input_ids"]
               for p in problems]
    sampling = SamplingConfig(temperature=1.0, n=n, max_new_tokens=max_response_len,
                              stop_token_ids=(tokenizer.eos_token_id,), seed=seed)
    rollouts = HFEngine(model).generate(prompts, sampling)
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    scores = get_reward_fn("hendrycks_math")(texts, [problems[r.prompt_index].answer for r in rollouts])
    correct = [0] * len(problems)
    for r, s in zip(rollouts, scores, strict=True):
        correct[r.prompt_index] += int(s >= 1.0)
    thoughts = count_thoughts(texts)
    curve = pass_at_k_curve(correct, n, range(1, n + 1))
    return {"correct": correct, "n": n, "avg": sum(correct) / (n * len(problems)),
            "pass_at_k": {str(k): v for k, v in curve.items()}, "thought_counts": asdict(thoughts),
            "thought_shares": thoughts.shares(),
            "response_len": sum(len(r.response_ids) for r in rollouts) / len(rollouts)}


def _curves(metrics_path: Path) -> dict[str, list[float | None]]:
    from dsrl_fast.train.metrics_log import read_metrics

    rows = [r for r in read_metrics(metrics_path) if "reward_mean" in r]
    keys = ("reward_mean", "transition_share", "reflection_share", "response_len_mean", "entropy")
    return {k: [r.get(k) for r in rows] for k in keys}


def run_one(args: argparse.Namespace, spec: RunSpec, warmup: Path) -> dict[str, Any]:
    """Train one run, evaluate its final model, write --out/runs/<name>.json and drop the run's checkpoints."""
    from dsrl_fast.train.config import load_config
    from dsrl_fast.train.trainer import train

    _set_threads(args.threads)
    _quiet()
    work = args.out / "work" / spec.name
    log = args.out / "work" / f"{spec.name}.log"
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        summary = train(load_config(None, _overrides(args, spec, warmup, work)))
        trained = time.perf_counter() - started
        result = evaluate_model(Path(summary.checkpoint_path), warmup / "eval.jsonl", args.eval_n,
                                args.max_response_len, seed=10_000 + spec.seed)
    result.update(name=spec.name, algo=spec.algo, switch=spec.switch, seed=spec.seed,
                  curves=_curves(work / "metrics.jsonl"),
                  train_seconds=trained, seconds=time.perf_counter() - started)
    path = args.out / "runs" / f"{spec.name}.json"
    path.with_suffix(".partial").write_text(json.dumps(result), encoding="utf-8")
    path.with_suffix(".partial").rename(path)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _check_options(args: argparse.Namespace) -> None:
    """Record the defining options in --out/options.json; exit 2 when --out holds results of other options."""
    mine = {k: getattr(args, k) for k in DEFINING}
    path = args.out / "options.json"
    if path.is_file():
        theirs = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"--{k.replace('_', '-')} {theirs.get(k)} -> {v}" for k, v in mine.items() if theirs.get(k) != v]
        if changed:
            print(f"--out {args.out} holds results made with other options ({'; '.join(changed)}): pass those "
                  "options or another --out", file=sys.stderr)
            raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1), encoding="utf-8")


def machine() -> str:
    """nproc and the CPU model of this machine."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"nproc {os.cpu_count()}, {cpu}"


def _git_sha() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
    return "unknown"


def _quiet() -> None:
    """No per-file progress bars from transformers (saving and loading the tiny model)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _check_options(args)
    _quiet()
    started = time.perf_counter()
    load = os.getloadavg()[0]  # before this invocation's own processes: other work on the machine
    for sub in ("runs", "work"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    _set_threads(args.threads)
    warmup = prepare_warmup(args)
    base_path = args.out / "runs" / "base.json"
    if not base_path.is_file():
        base = evaluate_model(warmup / "model", warmup / "eval.jsonl", args.eval_n, args.max_response_len,
                              seed=10_000)
        base_path.write_text(json.dumps(dict(base, name="base", algo="base", switch=None, seed=None)),
                             encoding="utf-8")
    specs = run_specs(args)
    todo = [s for s in specs if not (args.out / "runs" / f"{s.name}.json").is_file()]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} already done", file=sys.stderr, flush=True)
    done = len(specs) - len(todo)

    def report(spec: RunSpec, result: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        n = args.eval_n
        print(f"[{done}/{len(specs)}] {spec.name}: {result['seconds']:.0f} s, avg@{n} {result['avg']:.3f}, "
              f"pass@{n} {result['pass_at_k'][str(n)]:.3f}, reflection share "
              f"{result['thought_shares']['reflection']:.3f} ({time.perf_counter() - started:.0f} s elapsed)",
              file=sys.stderr, flush=True)

    if args.jobs == 1:
        for spec in todo:
            report(spec, run_one(args, spec, warmup))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, args, spec, warmup): spec for spec in todo}
            for future in as_completed(futures):
                report(futures[future], future.result())
    command = "python -m bench.paper_toy " + " ".join(sys.argv[1:] if argv is None else argv)
    path = write_report(args, command=command, sha=_git_sha(), seconds=time.perf_counter() - started,
                        machine=f"{machine()}, 1-minute load average {load:.1f} when it started")
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
