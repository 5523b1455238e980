"""Small reductions over the data-parallel ranks (no-ops in one process): host floats and small tensors in fp64."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "reduce_floats", "reduce_tensor"]


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_tensor(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` reduced over the ranks (sum by default; fp64 on the wire), same dtype and device; `t` in one process."""
    if not is_distributed():
        return t
    wire = t.detach().double()
    if dist.get_backend() == "nccl":
        wire = wire.cuda()
    dist.all_reduce(wire, op=op)
    return wire.to(t.device, t.dtype)


def reduce_floats(values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """Host floats reduced over the ranks (sum by default)."""
    if not is_distributed():
        return values
    return reduce_tensor(torch.tensor(values, dtype=torch.float64), op).tolist()
