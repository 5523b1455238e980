"""The GPU memory a plan assumes by default, and `optim.max_tokens_per_micro_batch=auto` for `dsrl-fast train`.

`auto` is resolved when the command line is read, before the config is built: on a CUDA machine it becomes the
plan's largest micro-batch for this launch (WORLD_SIZE ranks, as torchrun sets it, on this machine's GPU); without
CUDA the override is dropped and the config's own value stays, with a one-line notice (a CPU run has no GPU memory to
plan for).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

from dsrl_fast.planning.request import PlanRequest
from dsrl_fast.planning.units import GIB

DEFAULT_GPU_MEMORY = 80 * GIB
MICRO_BATCH_KEY = "optim.max_tokens_per_micro_batch"


def default_gpu_memory() -> tuple[int, str]:
    """(bytes, where from): the total memory of this machine's CUDA device (LOCAL_RANK's, else 0), else
    DEFAULT_GPU_MEMORY."""
    import torch

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"this machine's CUDA device {index} ({props.name}), total memory"
    return DEFAULT_GPU_MEMORY, "default (no CUDA device here): pass --gpu-memory, e.g. 80GB or 79.6GiB"


def _is_auto(item: str) -> bool:
    key, _, value = item.partition("=")
    return key.strip() == MICRO_BATCH_KEY and value.strip().lower() == "auto"


def resolve_auto_micro_batch(preset: str | None, config: str | None, overrides: Sequence[str]) -> list[str]:
    """`overrides` with `optim.max_tokens_per_micro_batch=auto` replaced by the plan's largest micro-batch (CUDA) or
    dropped (no CUDA: the config's value stays); unchanged without `auto`. A notice goes to stderr on rank 0.

    preset / config: the run's config source, as `dsrl-fast train` takes them.
    Raises ValueError when no micro-batch holding the longest sequence fits the GPU.
    """
    if not any(_is_auto(item) for item in overrides):
        return list(overrides)
    rest = [item for item in overrides if not _is_auto(item)]
    import torch

    request = PlanRequest(preset=preset, config=config, overrides=tuple(rest),
                          gpus=int(os.environ.get("WORLD_SIZE", "1")))
    if not torch.cuda.is_available():
        tokens = request.load_config().optim.max_tokens_per_micro_batch
        _notice(f"{MICRO_BATCH_KEY}=auto: no CUDA device, so the config's value {tokens} is used")
        return rest
    gpu_memory, source = default_gpu_memory()
    plan = dataclasses.replace(request, gpu_memory=gpu_memory, gpu_memory_source=source).plan()
    if plan.max_tokens is None or plan.max_tokens < plan.longest_sequence:
        raise ValueError(f"{MICRO_BATCH_KEY}=auto: no micro-batch holding the longest sequence "
                         f"({plan.longest_sequence} tokens) fits {gpu_memory / GIB:.1f} GiB on {request.gpus} GPU(s); "
                         f"`dsrl-fast plan` with the same arguments prints the changes that make it fit")
    verdict = "" if plan.fits else f"; the plan's peak {plan.peak / GIB:.1f} GiB still exceeds the GPU (see dsrl-fast plan)"
    _notice(f"{MICRO_BATCH_KEY}=auto: {plan.max_tokens} tokens, the largest micro-batch the plan fits in "
            f"{gpu_memory / GIB:.1f} GiB per GPU on {request.gpus} GPU(s){verdict}")
    return [*rest, f"{MICRO_BATCH_KEY}={plan.max_tokens}"]


def _notice(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
