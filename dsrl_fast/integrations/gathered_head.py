"""Fused log-probs with the LM-head weight gathered at call time, for a head patched into a peer's model.

A fused head reads the LM-head weight directly and never calls the LM-head module, so no sharding hook of that module
gathers it: under DeepSpeed ZeRO-3 the weight is a 0-element shard outside its module's forward, under FSDP2 a
DTensor shard. `gathered_head_weight` makes it whole when the head is called, whatever partitioned or wrapped the
model since it was patched (TRL's own fused head does the same, trl/trainer/utils.py); `gathered_head_logprobs` is
the padded-batch call with it:
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

__all__ = ["gathered_head_logprobs", "gathered_head_weight"]


@contextlib.contextmanager
def gathered_head_weight(weight: torch.Tensor, module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Yield the (V, H) LM-head weight whole for a fused call made inside `module`'s forward.

    weight: the LM-head parameter (plain, FSDP2 DTensor, or ZeRO-3 partitioned). A DTensor is all-gathered
    (differentiably); a ZeRO-3 weight becomes an external parameter of `module` (DeepSpeed gathers it with `module`
    for the backward) and is gathered for the block when it is partitioned.
    """
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            yield weight.full_tensor()
            return
    if not hasattr(weight, "ds_id"):
        yield weight
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    deepspeed.zero.register_external_parameter(module, weight)
    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        yield weight
        return
    with deepspeed.zero.GatheredParameters([weight]):
        yield weight


def gathered_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, *,
                           module: torch.nn.Module, temperature: float, with_entropy: bool,
                           impl: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`common.padded_linear_logprobs` with the head weight made whole by `gathered_head_weight`.

    hidden: (B, T, H) any float dtype; weight: (V, H) the LM-head parameter; targets: (B, T) int; keep: (B, T) bool;
    module: the module whose forward makes this call. Returns (log_probs (B, T) fp32, entropy (B, T) fp32 or None),
    zero where keep is False.
    """
    with gathered_head_weight(weight, module) as whole:
        return padded_linear_logprobs(hidden, whole, targets, keep, temperature=temperature,
                                      with_entropy=with_entropy, impl=impl)
