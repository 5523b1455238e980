"""A few DSRL updates of a tiny Qwen3 on fixed synthetic rollouts, plain or under torchrun, for equivalence tests.

    python tests/dist_worker.py --mode {torch,zero2,zero3} --steps 3 [--dtype bfloat16] --out result.json
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT tests/dist_worker.py --mode zero3 ...
    python tests/dist_worker.py --mode torch --algo reinforce_pp --epochs 2 ...   # another algorithm, 2 updates/step

Every process builds the same model and the same samples for all prompts, keeps its contiguous shard of prompts
(groups stay whole) and runs `run_update`; rank 0 writes per-step global loss, entropy, gradient norm, micro-batch counts and
per-tensor sums of squares of the final parameters (gathered under ZeRO-3) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.model.packed import prepare_packed_model
from dsrl_fast.data.packing import PackedBatch
from dsrl_fast.loss.token_loss import PolicyLossOutput
from dsrl_fast.rl.algorithms import Phase, phase_for_step
from dsrl_fast.train.batch_update import Packing, UpdateOptions, run_batch
from dsrl_fast.train.rl_step import StepSamples
from dsrl_fast.train.updaters import (
    DeepSpeedUpdater,
    PolicyModule,
    TorchUpdater,
    Updater,
    deepspeed_config,
)
from tests.model.test_model import VOCAB, tiny_model

MODES = ("torch", "zero2", "zero3")
PROMPTS, ROLLOUTS = 4, 4
MAX_TOKENS = 24
SWITCH_STEP = 1
PREFIX = (7,)
LR = 3e-3
WEIGHT_DECAY, BETAS, EPS = 0.01, (0.9, 0.999), 1e-8
# Active on the conditional (GRPO) steps, idle on the marginal one (its loss carries the 0.01 coefficient).
GRAD_CLIP = 0.5
BUCKET = 1 << 16


ALGOS = ("dsrl", "reinforce_pp", "reinforce_pp_baseline")


def phase(step: int, algo: str = "dsrl") -> Phase:
    """DSRL: NSR on the marginal (prompt-free) log-probs before SWITCH_STEP, GRPO after, authors' defaults (or
    another algorithm with the same options)."""
    return phase_for_step(step, algo=algo, switch_step=SWITCH_STEP, lr=LR, marginal_lr=None, clip_low=0.2,
                          clip_high=None, clip_ratio_c=10.0, agg=None, pretrain_loss_coef=0.01,
                          marginal_advantage="mean", kl_coef=0.0, kl_type="k3", entropy_coef=0.0, temperature=1.0,
                          max_response_len=16)


def step_samples(step: int) -> StepSamples:
    """All prompts' rollouts of `step`: prompts 0-1 get long responses, 2-3 short ones, so the second half of the
    prompts packs into fewer micro-batches (a 2-rank run pads rank 1 with filler micro-batches)."""
    gen = torch.Generator().manual_seed(1000 + step)
    prompts, responses, logps, rewards = [], [], [], []
    for g in range(PROMPTS):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(3, 7, (), generator=gen)),), generator=gen).tolist()
        lo, hi = (6, 13) if g < PROMPTS // 2 else (1, 5)
        group_rewards = [float(r) for r in torch.randint(0, 2, (ROLLOUTS,), generator=gen)]
        group_rewards[0], group_rewards[1] = 1.0, 0.0  # every group mixed: nonzero advantages, negatives for NSR
        for r in group_rewards:
            length = int(torch.randint(lo, hi, (), generator=gen))
            prompts.append(prompt)
            responses.append(torch.randint(0, VOCAB, (length,), generator=gen).tolist())
            logps.append((-torch.rand(length, generator=gen)).tolist())
            rewards.append(r)
    groups = torch.arange(PROMPTS).repeat_interleave(ROLLOUTS)
    return StepSamples(prompts, responses, logps, torch.tensor(rewards), groups)


def shard(samples: StepSamples, rank: int, world: int) -> StepSamples:
    """This rank's contiguous block of prompts with all their rollouts."""
    assert PROMPTS % world == 0, (PROMPTS, world)
    per = PROMPTS // world * ROLLOUTS
    lo, hi = rank * per, (rank + 1) * per
    return StepSamples(samples.prompt_ids[lo:hi], samples.response_ids[lo:hi], samples.sampler_logprobs[lo:hi],
                       samples.rewards[lo:hi], samples.group_ids[lo:hi])


class CountingUpdater:
    """Delegates to an updater and counts its micro-batch calls (filler ones carry loss_scale 0)."""

    def __init__(self, inner: Updater):
        self.inner = inner
        self.module = inner.module
        self.calls = 0
        self.fillers = 0

    def forward_backward(self, batch: PackedBatch, advantages: torch.Tensor, config: PolicyLossConfig, last: bool,
                         **kwargs: torch.Tensor | None) -> PolicyLossOutput:
        self.calls += 1
        self.fillers += int(config.loss_scale == 0)
        return self.inner.forward_backward(batch, advantages, config, last, **kwargs)

    def step(self, lr: float) -> float:
        return self.inner.step(lr)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.inner.named_parameters_for_sync()


def build_updater(mode: str, world: int, dtype: torch.dtype) -> Updater:
    """The tiny Qwen3 (seeded, in `dtype`, packed torch attention) under AdamW: plain for "torch", else DeepSpeed
    ZeRO; both keep fp32 masters for a 16-bit model."""
    model = prepare_packed_model(tiny_model("qwen3").to(dtype), attention_backend="torch").train()
    module = PolicyModule(model, impl="torch")
    if mode == "torch":
        if world != 1:
            raise ValueError(f"--mode torch runs in one process, got WORLD_SIZE={world}")
        return TorchUpdater(module, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS,
                            grad_clip=GRAD_CLIP)
    import deepspeed.ops

    # DeepSpeed's shared-memory op serves only its tensor-parallel inference all-reduce (training collectives go
    # through gloo); marking it unavailable skips its one-time C++ build (~25 s, minutes on a busy 2-core machine).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = deepspeed_config(zero_stage=2 if mode == "zero2" else 3, offload_optimizer=False, offload_params=False,
                              dtype=dtype, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS,
                              grad_clip=GRAD_CLIP)
    # DeepSpeed allocates its gradient buckets afresh each micro-step; the default 5e8 elements cost ~1 s on CPU.
    config["zero_optimization"].update(reduce_bucket_size=BUCKET, allgather_bucket_size=BUCKET)
    if mode == "zero3":
        # Partition every tensor: below this size ZeRO-3 keeps parameters whole on every rank, which would let the
        # tied head/embedding weight skip the gather that PolicyModule.register_head_for_zero3 arranges.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return DeepSpeedUpdater(module, config)


def _gather_counts(values: list[int], world: int) -> list[list[int]]:
    """Per-rank copies of `values` (a short list of ints), in rank order."""
    if world == 1:
        return [values]
    out = [torch.zeros(len(values), dtype=torch.int64) for _ in range(world)]
    dist.all_gather(out, torch.tensor(values, dtype=torch.int64))
    return [t.tolist() for t in out]


def _gather_floats(values: list[float], world: int) -> list[float]:
    """Every rank's `values` (equal lengths), concatenated in rank order."""
    if world == 1:
        return values
    out = [torch.zeros(len(values), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(out, torch.tensor(values, dtype=torch.float64))
    return [v for t in out for v in t.tolist()]


def run(mode: str, steps: int, dtype: torch.dtype = torch.float32, algo: str = "dsrl",
        epochs: int = 1) -> dict[str, Any]:
    """Train `steps` steps of `algo`, `epochs` updates per step (old log-probs recomputed); the result dict
    (identical on every rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    updater = CountingUpdater(build_updater(mode, world, dtype))
    records = []
    for step in range(steps):
        rule = phase(step, algo)
        samples = shard(step_samples(step), rank, world)
        calls, fillers = updater.calls, updater.fillers
        outcome = run_batch(updater, samples, rule, step=step, lr=rule.lr,
                            packing=Packing(PREFIX, MAX_TOKENS, torch.device("cpu")), options=UpdateOptions(epochs=epochs))
        result = outcome.update
        counts = _gather_counts([updater.calls - calls, updater.fillers - fillers], world)
        records.append({"algo": rule.algo, "loss": result.loss, "entropy": result.entropy, "grad_norm": result.grad_norm,
                        "kept_tokens": result.kept_tokens, "stepped": result.stepped,
                        "micro_batches": [c[0] for c in counts], "fillers": [c[1] for c in counts],
                        "updates": outcome.metrics["updates"], "clip_frac": result.clip_frac,
                        "advantages": _gather_floats(outcome.advantages.tolist(), world)})
    params = {name for name, _ in updater.module.model.named_parameters()}
    sumsq = {name: float(t.double().square().sum()) for name, t in updater.named_parameters_for_sync()
             if name in params}
    return {"mode": mode, "world_size": world, "steps": records, "param_sumsq": sumsq}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--algo", choices=ALGOS, default="dsrl")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    # DeepSpeed picks its accelerator when first imported (inside DeepSpeedUpdater): CPU with gloo here.
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    result = run(args.mode, args.steps, getattr(torch, args.dtype), args.algo, args.epochs)
    if int(os.environ.get("RANK", "0")) == 0:
        args.out.write_text(json.dumps(result, indent=1))
    if dist.is_initialized():
        # Gloo's barrier completes only after every earlier collective on the group, so no asynchronous ZeRO-3
        # gather is still in flight when the group is torn down (one CI run aborted in the teardown:
        # "terminate called without an active exception" after rank 0 had written its result).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
