"""Every algorithm of the paper's Table 1 (and ours) on the embedded toy task: same steps, same seed, one table.

    python -m bench.algorithms_toy                          # all algorithms, the default (short) run
    python -m bench.algorithms_toy --steps 60 --algos grpo,ppo,dsrl

Each run is the trainer end to end (`dsrl_fast.train.train`) on "Compute a+b." with a, b in [--low, --high]: the
embedded 2-layer Qwen3, a supervised warm-up of --sft-steps steps (identical for every algorithm: same seed), then
--steps RL steps of --prompts prompts × 8 rollouts at lr 1e-4 (the demo's; DESIGN §5), then the held-out accuracy of
one sampled answer per problem on --eval-size problems never trained on. dsrl runs NSR-PreRL at the demo's marginal
lr 1e-5 for the first quarter of the steps, then GRPO; ppo trains a critic (lr 1e-4) with 2 mini-batches × 2 epochs.
The supervised warm-up runs once: later runs load its weights (what they would compute anyway: same seed, same
data). The table (Markdown) goes to stdout; runs go under --out. The toy is tiny and the run short: differences of a
few points are within the run-to-run spread of one seed (the reward swings ±0.15 per step, DESIGN §5).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsrl_fast.train.warmup  # noqa: E402
from dsrl_fast.train.config import load_config  # noqa: E402
from dsrl_fast.train.metrics_log import read_metrics  # noqa: E402
from dsrl_fast.train.trainer import train  # noqa: E402

ALGOS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo", "nsr_rl", "psr_rl",
         "nsr_prerl", "dsrl")
# Per-algorithm overrides beyond the shared ones (the rest use the trainer's defaults for the toy).
EXTRA = {
    "ppo": ("optim.mini_batches=2", "optim.epochs=2", "critic.lr=1e-4"),
}


class _WarmupOnce:
    """Stands in for dsrl_fast.train.warmup.supervised_warmup: the first call trains, later ones load the trained weights."""

    def __init__(self) -> None:
        self.train = dsrl_fast.train.warmup.supervised_warmup
        self.done: tuple[dict[str, Any], Any] | None = None

    def __call__(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        if self.done is None:
            losses = self.train(model, *args, **kwargs)
            self.done = (copy.deepcopy(model.state_dict()), losses)
        model.load_state_dict(self.done[0])
        return self.done[1]


def _overrides(args: argparse.Namespace, algo: str, out: Path) -> list[str]:
    return [
        f"algo.algo={algo}", f"steps={args.steps}", f"algo.switch_step={max(1, args.steps // 4)}",
        f"prompts_per_step={args.prompts}", "rollout.n=8", f"sft.steps={args.sft_steps}", "sft.batch_size=64",
        f"data.toy_low={args.low}", f"data.toy_high={args.high}", f"data.eval_size={args.eval_size}",
        f"data.toy_train_size={args.train_size}", f"seed={args.seed}", "checkpoint_every=0", "keep_checkpoints=1",
        "progress=false", "log_samples=0", f"output_dir={out / algo}", "overwrite=true",
        # the settings of the recorded results: a fixed-length warm-up, one response per problem, no periodic eval
        "sft.target_accuracy=null", "eval_n=1", "eval_every=0", *EXTRA.get(algo, ()),
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
    dsrl_fast.train.warmup.supervised_warmup = _WarmupOnce()  # type: ignore[assignment]
    for algo in algos:
        started = time.perf_counter()
        summary = train(load_config(None, _overrides(args, algo, out)))
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
