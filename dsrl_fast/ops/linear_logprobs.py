"""Autograd function over the fused Triton log-prob kernels (kernels/linear_logprobs.py, shipped as dsrl_fast.kernels).

Backward: rows with zero gradient are compacted away; then either the dense path (per vocabulary slice the Triton
kernel writes dz and two cuBLAS GEMMs accumulate d_hidden in fp32 and write the d_weight slice once) or, when tile
skipping leaves a small enough share of (row block, vocabulary tile) pairs (dsrl_fast/ops/tile_skip.py), the
sparse path (the dz kernel and two Triton block-sparse GEMMs on the kept tiles only, kernels/sparse_grads.py).
Nothing is reduced with atomics, so two runs give bitwise-identical gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsrl_fast.kernels import linear_logprobs as kernels
from dsrl_fast.kernels import sparse_grads
from dsrl_fast.ops import tile_skip
from dsrl_fast.ops.gemm import matmul_into
from dsrl_fast.ops.torch_logprobs import active_rows


@dataclass(frozen=True)
class FusedOptions:
    """Non-tensor options of the fused op.

    temperature: logits divisor (> 0). with_entropy: also compute the softmax entropy.
    forward_config / dlogits_config: tile overrides for tuning; None takes the vetted default.
    slice_width: vocabulary columns per backward slice; None sizes it by kernels.slice_width.
    skip_threshold: leave out of the backward the (row block, vocabulary tile) pairs where every row's softmax
        mass is below this (tile_skip.DEFAULT_THRESHOLD = 2^-12), within a per-row dropped-mass budget; None
        computes every tile, and so does a backward with an entropy gradient.
    """

    temperature: float = 1.0
    with_entropy: bool = False
    forward_config: kernels.KernelConfig | None = None
    dlogits_config: kernels.KernelConfig | None = None
    slice_width: int | None = None
    skip_threshold: float | None = tile_skip.DEFAULT_THRESHOLD


@dataclass(frozen=True)
class BackwardInputs:
    """What the backward needs, rows compacted: hidden rows (A, H), weight (V, H), and per row labels (A,) int64,
    lse, g_logp (A,) fp32, entropy and g_ent (A,) fp32 or None (no entropy gradient)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    lse: torch.Tensor
    g_logp: torch.Tensor
    entropy: torch.Tensor | None
    g_ent: torch.Tensor | None


def dense_grads(x: BackwardInputs, options: FusedOptions, d_hidden: torch.Tensor | None,
           d_weight: torch.Tensor | None) -> None:
    """Slices of dz and cuBLAS GEMMs: d_hidden (A, H) fp32 accumulated, d_weight (V, H) written slice by slice."""
    rows, h_dim = x.hidden.shape
    v = x.weight.shape[0]
    inv_t = 1.0 / options.temperature
    width = min(options.slice_width or kernels.slice_width(v, x.hidden.element_size(), h_dim), v)
    dz = torch.empty((rows, width), dtype=x.hidden.dtype, device=x.hidden.device)
    for v0 in range(0, v, width):
        cols = min(width, v - v0)
        dz_slice = dz[:, :cols]
        kernels.dlogits(x.hidden, x.weight, x.labels, x.lse, x.entropy, x.g_logp, x.g_ent, inv_t, dz_slice,
                        v_begin=v0, config=options.dlogits_config)
        if d_hidden is not None:
            matmul_into(d_hidden, dz_slice, x.weight[v0:v0 + cols], accumulate=True)
        if d_weight is not None:
            matmul_into(d_weight[v0:v0 + cols], dz_slice.T, x.hidden, accumulate=False)


def sparse_grads_of(x: BackwardInputs, options: FusedOptions, tiles: tile_skip.TilePlan, d_hidden: torch.Tensor | None,
            d_weight: torch.Tensor | None) -> None:
    """dz of the kept pairs, slice by slice into packed tiles, then the block-sparse d_hidden / d_weight GEMMs."""
    cfg = options.dlogits_config or kernels.default_config("dlogits", x.hidden)
    inv_t = 1.0 / options.temperature
    dz = torch.empty((max(tiles.capacity, 1), cfg.block_n, cfg.block_v), dtype=x.hidden.dtype,
                     device=x.hidden.device)
    row_blocks = -(-x.hidden.shape[0] // cfg.block_n)
    for span in tiles.spans:
        count = span.pair_end - span.pair_begin
        packed = dz[:count]
        pairs = slice(span.pair_begin, span.pair_end)
        kernels.dlogits(x.hidden, x.weight, x.labels, x.lse, x.entropy, x.g_logp, x.g_ent, inv_t, packed,
                        pairs=tiles.pairs[pairs], config=cfg)
        if d_hidden is not None:
            sparse_grads.sparse_dhidden(packed, x.weight, tiles.tiles[pairs],
                                        tiles.row_ptr[span.row_ptr_begin:span.row_ptr_begin + row_blocks + 1],
                                        d_hidden)
        if d_weight is not None:
            n_tiles = span.tile_end - span.tile_begin
            sparse_grads.sparse_dweight(packed, x.hidden, tiles.slots[pairs], tiles.row_blocks[pairs],
                                        tiles.col_ptr[span.col_ptr_begin:span.col_ptr_begin + n_tiles + 1],
                                        d_weight, span.tile_begin)


def tile_plan(masses: torch.Tensor, rows: torch.Tensor | None, x: BackwardInputs,
              options: FusedOptions, fwd_block_v: int) -> tuple[float, tile_skip.TilePlan | None]:
    """(kept share, plan or None) of the backward of rows `rows` (None: all) from the forward's tile masses (T_f,
    N) fp16 (tile_skip.tile_masses). The plan (host lists, the dense path's dz workspace as a slice's capacity) is built only when some pair
    is skipped and the kept share is at most tile_skip.SPARSE_MAX_KEPT_SHARE; one host sync either way."""
    cfg = options.dlogits_config or kernels.default_config("dlogits", x.hidden)
    v = x.weight.shape[0]
    assert options.skip_threshold is not None
    keep = tile_skip.kept_pairs(masses, rows, cfg.block_n, cfg.block_v, fwd_block_v, v, options.skip_threshold)
    share = float(keep.float().mean())
    if share > tile_skip.SPARSE_MAX_KEPT_SHARE or share == 1.0:
        return share, None
    width = min(options.slice_width or kernels.slice_width(v, x.hidden.element_size(), x.hidden.shape[1]), v)
    return share, tile_skip.plan(keep, keep.shape[0] * max(1, width // cfg.block_v))


def backward_rows(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                  entropy: torch.Tensor | None, grad_logprobs: torch.Tensor | None,
                  grad_entropy: torch.Tensor | None, options: FusedOptions, compute_dh: bool, compute_dw: bool,
                  masses: torch.Tensor | None = None,
                  fwd_block_v: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None, float | None]:
    """(d_hidden (N, H) in hidden's dtype, d_weight (V, H) in weight's dtype, kept share or None) of the op.

    grad_logprobs: (N,) fp32 or None (no gradient); grad_entropy: (N,) fp32 or None (the cheaper kernel variant
    runs); entropy must be given with grad_entropy. masses: the forward's (T_f, N) fp16 tile masses
    (tile_skip.tile_masses) when skipping is on, None otherwise. d_weight is written once from fp32
    accumulators, so it equals an fp32 d_weight rounded once to the weight's dtype. The kept share is None when
    no tile statistics were used (none given, an entropy gradient, or no row with a gradient).
    """
    n, h_dim = hidden.shape
    idx = None
    if (compute_dh or compute_dw) and (grad_logprobs is not None or grad_entropy is not None):
        idx = active_rows(grad_logprobs, grad_entropy)
    if idx is None or idx.numel() == 0:
        return (torch.zeros_like(hidden) if compute_dh else None, torch.zeros_like(weight) if compute_dw else None,
                None)
    rows = idx.numel()
    compact = rows < n

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, idx).contiguous() if compact else t.contiguous()

    g_ent = take(grad_entropy.float()) if grad_entropy is not None else None
    x = BackwardInputs(hidden=take(hidden), weight=weight, labels=take(labels), lse=take(lse),
                       g_logp=take(grad_logprobs.float()) if grad_logprobs is not None else lse.new_zeros(rows),
                       entropy=take(entropy) if g_ent is not None else None, g_ent=g_ent)
    d_hidden = torch.zeros((rows, h_dim), dtype=torch.float32, device=hidden.device) if compute_dh else None
    d_weight = torch.empty_like(weight) if compute_dw else None
    # The entropy gradient's dropped part, p·|log p + H| per element, is ~|ln threshold| + H times the log-prob's:
    # with an entropy gradient every tile is computed.
    skipping = masses is not None and g_ent is None
    kept, plan = tile_plan(masses, idx if compact else None, x, options, fwd_block_v) if skipping else (None, None)
    if plan is not None:
        sparse_grads_of(x, options, plan, d_hidden, d_weight)
    else:
        dense_grads(x, options, d_hidden, d_weight)
    if d_hidden is None:
        return None, d_weight, kept
    if not compact:
        return d_hidden.to(hidden.dtype), d_weight, kept
    return torch.zeros_like(hidden).index_copy_(0, idx, d_hidden.to(hidden.dtype)), d_weight, kept


class TritonLinearLogprobs(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), labels (N,)) -> (logprobs (N,) fp32, entropy (N,) fp32 or empty)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                options: FusedOptions) -> tuple[torch.Tensor, torch.Tensor]:
        inv_t = 1.0 / options.temperature
        cfg = options.forward_config or kernels.default_config("forward", hidden)
        skipping = options.skip_threshold is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        tile_lse = None
        if skipping:
            tile_lse = torch.empty((-(-weight.shape[0] // cfg.block_v), hidden.shape[0]), dtype=torch.float32,
                                   device=hidden.device)
        partials = kernels.forward_partials(hidden, weight, labels, inv_t, options.with_entropy, cfg,
                                            tile_lse=tile_lse)
        lse, label_logit, entropy = kernels.combine_partials(partials)
        masses = None
        if tile_lse is not None:
            masses = tile_skip.tile_masses(tile_lse, lse, labels, cfg.block_v)
            del tile_lse
        if not options.with_entropy:
            entropy = lse.new_empty(0)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy, masses)
        ctx.options = options
        ctx.fwd_block_v = cfg.block_v
        ctx.mark_non_differentiable(labels)
        # An unused output's gradient arrives as None, not zeros: the entropy-gradient variant runs only when needed.
        ctx.set_materialize_grads(False)
        return label_logit - lse, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor | None,
                 grad_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, lse, entropy, masses = ctx.saved_tensors
        options: FusedOptions = ctx.options
        if not options.with_entropy:
            grad_entropy = None
        d_hidden, d_weight, _ = backward_rows(
            hidden, weight, labels, lse, entropy if grad_entropy is not None else None, grad_logprobs, grad_entropy,
            options, compute_dh=ctx.needs_input_grad[0], compute_dw=ctx.needs_input_grad[1], masses=masses,
            fwd_block_v=ctx.fwd_block_v,
        )
        return d_hidden, d_weight, None, None
