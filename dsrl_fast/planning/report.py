"""Text rendering of a MemoryPlan: the table, the verdict, vLLM's KV-cache capacity, the guesses, the fixes."""

from __future__ import annotations

from collections.abc import Sequence

from dsrl_fast.planning.fixes import Fix
from dsrl_fast.planning.memory import MICRO_BATCH, STEP, MemoryPlan
from dsrl_fast.planning.units import GIB, gib_and_gb
from dsrl_fast.planning.vllm import VllmShare

__all__ = ["format_plan"]

_PHASE_LABEL = {"always": "both phases", "rollout": "rollout", "update": "update", MICRO_BATCH: "micro-batch",
                STEP: "optimizer step"}
# What bench/gpu_run.py (its update_step section, bench/real_step.py) measures against the plan.
CALIBRATED = ("bench/gpu_run.py measures the trainer's lines of one update step (weights + masters + optimizer "
              "states, the micro-batch peak, the optimizer step: allocated bytes, one GPU, no vLLM); it measures "
              "none of the guesses above and none of vLLM's lines")


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:8.2f}"


def _table(plan: MemoryPlan) -> list[str]:
    other_label = f"(activations with checkpointing {'off' if plan.gradient_checkpointing else 'on'})"
    width = max(len(other_label), *(len(i.name) for i in plan.items))
    lines = [f"{'per GPU':<{width}}  {'GiB':>8}  {'held during':<14}  note", "-" * (width + 40)]
    for item in plan.items:
        lines.append(f"{item.name:<{width}}  {_gib(item.nbytes)}  {_PHASE_LABEL[item.phase]:<14}  {item.note}".rstrip())
    lines.append(f"{other_label:<{width}}  {_gib(plan.activations_other)}")
    lines.append("-" * (width + 40))
    lines.append(f"{'peak, update phase':<{width}}  {_gib(plan.update_peak)}")
    lines.append(f"{'peak, rollout phase':<{width}}  {_gib(plan.rollout_peak)}")
    return lines


def _rollouts(v: VllmShare) -> list[str]:
    lines = [f"vLLM KV cache: {gib_and_gb(max(0, v.kv_cache))} per GPU at {v.kv_bytes_per_token:,} bytes per token "
             f"-> {v.kv_tokens:,} tokens per engine ({v.tensor_parallel} GPU{'s' if v.tensor_parallel > 1 else ''})",
             f"  full-length sequences ({v.sequence_len:,} tokens) held at once: {v.full_sequences:,}; rollouts per "
             f"engine per step: {v.rollouts:,} (vLLM's max_num_seqs: {v.max_num_seqs:,})"]
    if not v.starts:
        lines.append("  vLLM WILL NOT START: its budget leaves no KV cache for one full-length sequence")
    elif v.preemption_bound:
        need = min(v.rollouts, v.max_num_seqs) * v.sequence_len * v.kv_bytes_per_token
        lines.append(f"  PREEMPTION-BOUND: when more than {v.full_sequences:,} rollouts run long, vLLM preempts and "
                     f"recomputes them (all at full length need {need / GIB:.1f} GiB of KV cache per GPU)")
    else:
        lines.append("  every rollout fits the KV cache at full length: no preemption")
    return lines


def _guesses(plan: MemoryPlan) -> list[str]:
    reserve = next(i.nbytes for i in plan.items if i.name.startswith("runtime reserve"))
    guesses = [f"runtime reserve {reserve / GIB:.2f} GiB (--reserve)"]
    if plan.vllm is not None:
        guesses.append(f"vLLM CUDA-graph pool {plan.vllm.cuda_graphs / GIB:.2f} GiB (--cuda-graph-memory)")
        if plan.vllm.tensor_parallel > 1:
            guesses.append(f"vLLM communication buffers {plan.vllm.comm_buffers / GIB:.2f} GiB (--comm-buffers)")
        guesses.append("vLLM profiling peak (a formula of the shapes and vLLM's batch defaults)")
    return [f"guesses, not measured: {'; '.join(guesses)}", f"  {CALIBRATED}"]


def _fixes(plan: MemoryPlan, fixes: Sequence[Fix]) -> list[str]:
    if plan.fits:
        return []
    if not fixes:
        return ["", "no change tried here fits (optimizer offload, ZeRO-3, parameter offload, vLLM utilization and "
                    "tensor parallelism, micro-batch): more GPUs or larger ones"]
    lines = ["", "changes that fit (each re-planned; largest micro-batch first):"]
    for fix in fixes:
        lines.append(f"  # micro-batches up to {fix.plan.max_tokens:,} tokens; peak {fix.plan.peak / GIB:.2f} GiB: "
                     + " ".join(fix.overrides))
        lines.append(f"  {fix.command}")
    return lines


def format_plan(plan: MemoryPlan, fixes: Sequence[Fix] = ()) -> str:
    """The plan as a table (GiB per GPU), the verdict, the largest micro-batch that fits, vLLM's KV-cache capacity
    against the step's rollouts, the guessed lines, and `fixes` (dsrl_fast.planning.fixes.find_fixes) when it does
    not fit."""
    gpus = f"{plan.gpus} GPU{'s' if plan.gpus > 1 else ''} x {gib_and_gb(plan.gpu_memory)}"
    lines = [
        f"model      : {plan.model} ({plan.parameters:,} parameters, {plan.dtype})",
        f"hardware   : {gpus}; {plan.updater}",
        f"GPU memory : from {plan.gpu_memory_source}",
        f"micro-batch: {plan.tokens:,} packed tokens, all scored (worst case); gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}; fused loss model '{plan.loss_kind}'",
        "",
        *_table(plan),
        "",
        f"fits: {'yes' if plan.fits else 'NO'} (peak {gib_and_gb(plan.peak)} of {gib_and_gb(plan.gpu_memory)} per GPU)",
    ]
    if plan.max_tokens is None:
        lines.append("largest optim.max_tokens_per_micro_batch that fits: none (the state alone does not fit)")
    else:
        usable = "" if plan.max_tokens >= plan.longest_sequence else (
            f"; below the longest sequence ({plan.longest_sequence:,} tokens): does not fit")
        lines.append(f"largest optim.max_tokens_per_micro_batch that fits: {plan.max_tokens:,} "
                     f"(configured: {plan.tokens:,}){usable}")
    if plan.vllm is not None:
        lines += ["", *_rollouts(plan.vllm)]
    lines += ["", *_guesses(plan), *_fixes(plan, fixes)]
    return "\n".join(lines)
