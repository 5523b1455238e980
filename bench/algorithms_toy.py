"""Every algorithm of the paper's Table 1 (and ours) on the embedded toy task: same steps, same seed, one table.

    python -m bench.algorithms_toy                          # all algorithms, the default (short) run
    python -m bench.algorithms_toy --steps 60 --algos grpo,ppo,dsrl

Each run is the trainer end to end (`dsrl_fast.train.train`) on "Compute a+b." with a, b in [--low, --high]: the
embedded 2-layer Qwen3, a supervised warm-up of --sft-steps steps (identical for every algorithm: same seed), then
--steps RL steps of --prompts prompts × 8 rollouts at lr 1e-4 (the demo's; DESIGN §5), then the held-out accuracy of
one sampled answer per problem on --eval-size problems never trained on. dsrl runs NSR-PreRL at the demo's marginal
lr 1e-5 for the first quarter of the steps, then GRPO; ppo trains a critic (lr 1e-4) with 2 mini-batches × 2 epochs.
The supervised warm-up runs once, into --out/warmup (a Hugging Face model and the train/held-out problems as JSONL);
every algorithm's run is the plain trainer started from that model (model.name_or_path, data.train_path,
data.eval_path). The table (Markdown) goes to stdout; runs go under --out. The toy is tiny and the run short: differences of a
few points are within the run-to-run spread of one seed (the reward swings ±0.15 per step, DESIGN §5).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.toy_splits import TEMPLATE, write_splits  # noqa: E402
from dsrl_fast.data.toy import build_toy_tokenizer, make_addition_problems  # noqa: E402
from dsrl_fast.model.tiny import build_tiny_qwen3, save_tiny_model  # noqa: E402
from dsrl_fast.train.config import load_config  # noqa: E402
from dsrl_fast.train.metrics_log import read_metrics  # noqa: E402
from dsrl_fast.train.sections import SFTConfig  # noqa: E402
from dsrl_fast.train.trainer import train  # noqa: E402
from dsrl_fast.train.warmup import supervised_warmup  # noqa: E402

ALGOS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo", "nsr_rl", "psr_rl",
         "nsr_prerl", "dsrl")
# Per-algorithm overrides beyond the shared ones (the rest use the trainer's defaults for the toy).
EXTRA = {
    "ppo": ("optim.mini_batches=2", "optim.epochs=2", "critic.lr=1e-4"),
}


def _warm_up(args: argparse.Namespace, root: Path) -> Path:
    """The shared warm-up: the toy model trained --sft-steps steps, saved with the train/held-out problems."""
    problems = make_addition_problems(args.train_size + args.eval_size, seed=args.seed, low=args.low, high=args.high)
    write_splits(root, problems, args.train_size)
    tokenizer = build_toy_tokenizer()
    model = build_tiny_qwen3(len(tokenizer), seed=args.seed, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    supervised_warmup(model, tokenizer, problems[:args.train_size], SFTConfig(steps=args.sft_steps, batch_size=64),
                      seed=args.seed)
    return save_tiny_model(model, tokenizer, root / "model")


def _overrides(args: argparse.Namespace, algo: str, warmup: Path, out: Path) -> list[str]:
    return [
        f"model.name_or_path={warmup / 'model'}", "model.gradient_checkpointing=false", "model.dtype=float32",
        f"data.train_path={warmup / 'train.jsonl'}", f"data.eval_path={warmup / 'eval.jsonl'}",
        f"data.template={TEMPLATE}", "data.max_prompt_len=16", "rollout.max_response_len=16", "epochs=null",
        "optim.lr=1e-4", "optim.marginal_lr=1e-5", "optim.weight_decay=0.0", "algo.pretrain_loss_coef=1.0",
        "algo.clip_ratio_c=10.0", "reward=math_verify", "rollout.engine=hf", "deepspeed.enabled=false",
        "optim.max_tokens_per_micro_batch=4096", "eval_every=0",
        f"algo.algo={algo}", f"steps={args.steps}", f"algo.switch_step={max(1, args.steps // 4)}",
        f"prompts_per_step={args.prompts}", "rollout.n=8", f"seed={args.seed}", "checkpoint_every=0",
        "keep_checkpoints=1", "progress=false", "log_samples=0", f"output_dir={out / algo}", "overwrite=true",
        "eval_n=1", *EXTRA.get(algo, ()),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="RL steps of every run")
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated algo names")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (x 8 rollouts)")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--low", type=int, default=10)
    parser.add_argument("--high", type=int, default=49)
    parser.add_argument("--train-size", type=int, default=1200)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary one)")
    args = parser.parse_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    unknown = sorted(set(algos) - set(ALGOS))
    if unknown:
        parser.error(f"--algos must name algorithms from {ALGOS}, got {unknown}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    out = args.out or Path(tempfile.mkdtemp(prefix="algorithms_toy_"))
    rows = []
    warmup = _warm_up(args, out / "warmup").parent
    for algo in algos:
        started = time.perf_counter()
        summary = train(load_config(None, _overrides(args, algo, warmup, out)))
        records = [r for r in read_metrics(out / algo / "metrics.jsonl") if "reward_mean" in r]
        tail = records[-max(1, len(records) // 4):]
        rows.append((algo, summary.accuracy_before, summary.accuracy_after,
                     sum(r["reward_mean"] for r in tail) / len(tail), time.perf_counter() - started))
        print(f"{algo}: held-out {summary.accuracy_before:.3f} -> {summary.accuracy_after:.3f}", file=sys.stderr)
    print(f"\n{args.steps} RL steps x {args.prompts} prompts x 8 rollouts, seed {args.seed}, toy a+b with a, b in "
          f"[{args.low}, {args.high}], held-out accuracy of one sampled answer on {args.eval_size} problems\n")
    print("| algo | held-out before | held-out after | mean reward, last quarter of steps | seconds |")
    print("|---|---|---|---|---|")
    for algo, before, after, reward, seconds in rows:
        print(f"| {algo} | {before:.3f} | {after:.3f} | {reward:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
