"""flash_attn.bert_padding's helpers that OpenRLHF uses, after flash_attn's documented contract (tests only)."""

from __future__ import annotations

import torch
from einops import rearrange

__all__ = ["index_first_axis", "pad_input", "rearrange", "unpad_input"]


def unpad_input(hidden: torch.Tensor, mask: torch.Tensor):
    """(values of the unmasked positions, their flat indices, cu_seqlens int32, max_seqlen, seqused)."""
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return hidden.flatten(0, 1)[indices], indices, cu_seqlens, int(lengths.max()), lengths


def pad_input(values: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of unpad_input: (batch, seqlen, ...) with zeros at the masked positions."""
    out = values.new_zeros(batch * seqlen, *values.shape[1:]).index_put((indices,), values)
    return out.view(batch, seqlen, *values.shape[1:])


def index_first_axis(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return values[indices]
