"""Text rendering of a MemoryPlan, and parsing of memory sizes such as "80GiB"."""

from __future__ import annotations

import re

from dsrl_fast.planning.memory import GIB, MICRO_BATCH, STEP, MemoryPlan

_UNITS = {"": GIB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20,
          "gib": GIB, "tib": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")
_PHASE_LABEL = {"always": "both phases", "rollout": "rollout", "update": "update", MICRO_BATCH: "micro-batch",
                STEP: "optimizer step"}


def parse_memory(text: str) -> int:
    """Bytes of a size like "80GiB", "80 GB" (10^9), "81920MiB" or "80" (GiB when no unit is given)."""
    if not isinstance(text, str):
        raise TypeError(f"memory size must be a string like '80GiB', got {type(text).__name__}")
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"memory size must be a positive number with an optional unit "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:8.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table (GiB per GPU) followed by the verdict and the largest micro-batch that fits."""
    gpus = f"{plan.gpus} GPU{'s' if plan.gpus > 1 else ''} x {plan.gpu_memory / GIB:.1f} GiB"
    lines = [
        f"model     : {plan.model} ({plan.parameters:,} parameters, {plan.dtype})",
        f"hardware  : {gpus}; {plan.updater}",
        f"micro-batch: {plan.tokens:,} packed tokens, all scored (worst case); gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}; fused loss model '{plan.loss_kind}'",
        "",
    ]
    other = "off" if plan.gradient_checkpointing else "on"
    other_label = f"(activations with checkpointing {other})"
    width = max(len(other_label), *(len(i.name) for i in plan.items))
    lines.append(f"{'per GPU':<{width}}  {'GiB':>8}  {'held during':<14}  note")
    lines.append("-" * (width + 40))
    for item in plan.items:
        lines.append(f"{item.name:<{width}}  {_gib(item.nbytes)}  {_PHASE_LABEL[item.phase]:<14}  {item.note}".rstrip())
    lines.append(f"{other_label:<{width}}  {_gib(plan.activations_other)}")
    lines.append("-" * (width + 40))
    lines.append(f"{'peak, update phase':<{width}}  {_gib(plan.update_peak)}")
    lines.append(f"{'peak, rollout phase':<{width}}  {_gib(plan.rollout_peak)}")
    verdict = "yes" if plan.fits else "NO"
    lines.append("")
    lines.append(f"fits: {verdict} (peak {plan.peak / GIB:.2f} GiB of {plan.gpu_memory / GIB:.2f} GiB per GPU)")
    if plan.max_tokens is None:
        lines.append("largest optim.max_tokens_per_micro_batch that fits: none (the state alone does not fit)")
    else:
        usable = "" if plan.max_tokens >= plan.longest_sequence else (
            f"; below the longest sequence ({plan.longest_sequence:,} tokens): does not fit")
        lines.append(f"largest optim.max_tokens_per_micro_batch that fits: {plan.max_tokens:,} "
                     f"(configured: {plan.tokens:,}){usable}")
    return "\n".join(lines)
