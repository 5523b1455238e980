"""Fused log-probs with the LM-head weight gathered at call time, for a head patched into a peer's model.

A fused head reads the LM-head weight directly and never calls the LM-head module, so no sharding hook of that module
gathers it: under DeepSpeed ZeRO-3 the weight is a 0-element shard outside its module's forward, under FSDP2 a
DTensor shard. `gathered_head_logprobs` makes it whole when it is called, whatever partitioned or wrapped the model
since it was patched (TRL's own fused head does the same, trl/trainer/utils.py):
- FSDP2: `DTensor.full_tensor()`, an all-gather whose backward reduce-scatters the weight's gradient.
- ZeRO-3: the weight becomes an external parameter of the module whose forward makes the call
  (`deepspeed.zero.register_external_parameter`), so DeepSpeed's hooks of that module gather it for the backward (the
  kernels recompute the logits there) and keep it whole until its gradient is accumulated and reduced. The first
  call, made after that module's forward hook ran, gathers it itself. DeepSpeed 0.19 registers such a parameter on
  its own when it is read inside the forward of a model that `deepspeed.initialize` wrapped; this does it wherever
  the head is called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dsrl_fast.integrations.common import padded_linear_logprobs

__all__ = ["gathered_head_logprobs"]


def _full_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as a regular tensor: an FSDP2 DTensor shard is all-gathered (differentiably)."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            return weight.full_tensor()
    return weight


@contextlib.contextmanager
def _zero3_gathered(weight: torch.Tensor, module: torch.nn.Module) -> Iterator[None]:
    """Make a ZeRO-3 `weight` an external parameter of `module` and have it whole for the block (a no-op for a
    weight DeepSpeed does not manage)."""
    if not hasattr(weight, "ds_id"):
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    deepspeed.zero.register_external_parameter(module, weight)
    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        yield
        return
    with deepspeed.zero.GatheredParameters([weight]):
        yield


def gathered_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, *,
                           module: torch.nn.Module, temperature: float, with_entropy: bool,
                           impl: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`common.padded_linear_logprobs` with the head weight gathered for the call when it is sharded.

    hidden: (B, T, H) any float dtype; weight: (V, H) the LM-head parameter (ZeRO-3 shard, FSDP2 DTensor or a plain
    tensor); targets: (B, T) int; keep: (B, T) bool; module: the module whose forward makes this call (under ZeRO-3
    DeepSpeed gathers the weight with it for the backward). Returns (log_probs (B, T) fp32, entropy (B, T) fp32 or
    None), zero where keep is False.
    """
    weight = _full_weight(weight)
    with _zero3_gathered(weight, module):
        return padded_linear_logprobs(hidden, weight, targets, keep, temperature=temperature,
                                      with_entropy=with_entropy, impl=impl)
