"""The packed attention's hook into transformers models: an attention function registered as "dsrl_varlen".
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from dsrl_fast.ops.varlen_attention import BACKENDS, packed_metadata_from_position_ids, varlen_attention

TRANSFORMERS_ATTENTION_NAME = "dsrl_varlen"


def _transformers_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            *, backend: str, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, L, D), key/value (B, Hkv, L, D) -> ((B, L, Hq, D), None)."""
    if attention_mask is not None:
        raise ValueError("attention_mask must be None for the packed attention (pack sequences in one row with "
                         f"position_ids restarting at 0 instead of padding), got shape {tuple(attention_mask.shape)}")
    if dropout != 0.0:
        raise ValueError(f"dropout must be 0.0 for the packed attention, got {dropout}")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported by the packed attention, got {kwargs[name]!r}")
    if kwargs.get("is_causal") is False:
        raise ValueError("is_causal must be True for the packed attention, got False")
    batch, hq, seq_len, head_dim = query.shape
    if key.shape[2] != seq_len:
        raise ValueError(f"key length must equal query length {seq_len} (no KV cache), got {key.shape[2]}")
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is not None and max_seqlen is not None:
        cu_seqlens, max_seqlen = cu_seqlens.to(torch.int32), int(max_seqlen)
    elif kwargs.get("position_ids") is not None:
        cu_seqlens, max_seqlen = packed_metadata_from_position_ids(kwargs["position_ids"], batch, seq_len)
    else:
        cu_seqlens = torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int32, device=query.device)
        max_seqlen = seq_len
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], head_dim) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scaling, backend=backend,
                           check_cu_seqlens=False)
    return out.view(batch, seq_len, hq, head_dim), None


def register_transformers_attention(backend: str = "auto") -> str:
    """Register the packed attention with transformers as "dsrl_varlen" and return that name.

    Use: `model.set_attn_implementation("dsrl_varlen")`, then call the model on a packed row (batch 1,
    position_ids restarting at 0 per sequence, attention_mask=None, use_cache=False). Sequence boundaries come
    from the `cu_seq_lens_q` (S+1,) int32 and `max_length_q` int model kwargs when given (transformers forwards
    them to every attention layer; no host sync), else from position_ids (one host sync per layer), else each
    batch row is one sequence. A padding attention_mask raises: transformers does not build masks for this
    implementation. Registering again replaces the backend for every model using the name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    AttentionInterface.register(TRANSFORMERS_ATTENTION_NAME, partial(_transformers_attention, backend=backend))
    # The flash-attention mask function hands padding masks through (so we can refuse them) and returns None for
    # unpadded input, so no dense mask is ever built.
    AttentionMaskInterface.register(TRANSFORMERS_ATTENTION_NAME, flash_attention_mask)
    return TRANSFORMERS_ATTENTION_NAME
