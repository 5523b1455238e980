"""Changes that make a plan fit, each re-planned and printed as a `dsrl-fast train ... key=value` command.

Candidates, each on top of the request's own overrides: the optimizer on the CPU (DeepSpeed offload, ZeRO-2 or the
configured stage), ZeRO-3 (several GPUs), both, ZeRO-3 with the parameters offloaded too; gradient checkpointing when
it is off. Each is re-planned; where the rollout phase is what overflows, rollout.gpu_memory_utilization is lowered
to the largest multiple of 0.05 that leaves room (and rollout.tensor_parallel_size raised where the KV cache then
holds no full-length sequence); where the configured micro-batch is what overflows, it is set to the largest that
fits. A candidate is kept only when the final re-plan fits; the kept ones are ordered by the largest micro-batch they
allow, then by how few changes they make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsrl_fast.planning.memory import MemoryPlan
from dsrl_fast.planning.request import PlanRequest
from dsrl_fast.planning.shapes import model_config
from dsrl_fast.planning.vllm import vllm_share

UTILIZATION_STEP = 0.05
MAX_FIXES = 4


@dataclass(frozen=True)
class Fix:
    """`overrides` that, added to the request's own, give `plan` (which fits); `command` launches the run."""

    overrides: tuple[str, ...]
    plan: MemoryPlan
    command: str


def _trainer_variants(cfg, gpus: int) -> list[tuple[str, ...]]:
    """Override sets that shrink the trainer's state, smallest change first."""
    ds = cfg.deepspeed
    enable = ("deepspeed.enabled=true",) if gpus == 1 and ds.enabled is not True else ()
    stage = () if ds.zero_stage >= 1 else ("deepspeed.zero_stage=2",)
    variants: list[tuple[str, ...]] = [()]
    if not ds.offload_optimizer:
        variants.append((*enable, *stage, "deepspeed.offload_optimizer=true"))
    if gpus > 1 and ds.zero_stage < 3:
        variants.append(("deepspeed.zero_stage=3",))
        variants.append(("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true"))
    if not ds.offload_params:
        variants.append((*enable, "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                         "deepspeed.offload_params=true"))
    if not cfg.model.gradient_checkpointing:
        variants = [("model.gradient_checkpointing=true", *v) for v in variants]
    return variants


def _rollout_overrides(request: PlanRequest, plan: MemoryPlan) -> tuple[str, ...] | None:
    """Overrides that bring the rollout phase within the GPU (lower utilization, then tensor parallel for the KV
    cache); () when it already fits, None when nothing here does."""
    v = plan.vllm
    if v is None or (plan.rollout_peak <= plan.gpu_memory and v.starts):
        return ()
    others = plan.rollout_peak - v.budget
    share = math.floor((plan.gpu_memory - others) / plan.gpu_memory / UTILIZATION_STEP) * UTILIZATION_STEP
    share = min(round(share, 2), v.utilization)
    if share < UTILIZATION_STEP:
        return None
    lower = () if share == v.utilization else (f"rollout.gpu_memory_utilization={share:g}",)
    tp = v.tensor_parallel
    while True:
        extra = (*lower, f"rollout.tensor_parallel_size={tp}") if tp != v.tensor_parallel else lower
        cfg = request.with_overrides(*extra).load_config()
        candidate = vllm_share(cfg, model_config(cfg.model.name_or_path), params=plan.parameters,
                               bytes_per_value=getattr(torch, plan.dtype).itemsize, gpus=request.gpus,
                               gpu_memory=plan.gpu_memory, reserves=request.vllm_reserves)
        if candidate.starts:
            return extra
        tp *= 2
        if tp > request.gpus or request.gpus % tp:
            return None


def find_fixes(request: PlanRequest, plan: MemoryPlan) -> list[Fix]:
    """Commands that make `plan` (of `request`) fit, largest micro-batch first; [] when it fits or nothing does.

    Raises ValueError/TypeError as plan_memory does (a fix's overrides are valid config keys, so only a request that
    could not be planned in the first place raises).
    """
    if plan.fits:
        return []
    cfg = request.load_config()
    fixes: dict[tuple[str, ...], Fix] = {}
    for variant in _trainer_variants(cfg, request.gpus):
        trial = request.with_overrides(*variant)
        rollout = _rollout_overrides(trial, trial.plan())
        if rollout is None:
            continue
        trial = trial.with_overrides(*rollout)
        trial_plan = trial.plan()
        if trial_plan.max_tokens is None or trial_plan.max_tokens < trial_plan.longest_sequence:
            continue
        overrides = (*variant, *rollout)
        if trial_plan.update_peak > trial_plan.gpu_memory:
            overrides += (f"optim.max_tokens_per_micro_batch={trial_plan.max_tokens}",)
            trial = trial.with_overrides(overrides[-1])
            trial_plan = trial.plan()
        if trial_plan.fits and overrides:
            fixes[overrides] = Fix(overrides, trial_plan, trial.train_command())
    ranked = sorted(fixes.values(), key=lambda f: (-(f.plan.max_tokens or 0), len(f.overrides)))
    return ranked[:MAX_FIXES]
