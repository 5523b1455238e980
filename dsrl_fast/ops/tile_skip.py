"""Vocabulary-tile skipping for the fused log-prob backward: which (row block, vocabulary tile) pairs to compute.

Cut Cross-Entropy's gradient filtering, combined with our row compaction and a bound on what is dropped. The
log-prob gradient is d loss / d z = g·(onehot − p), so a vocabulary tile whose softmax is negligible for every row
of a block contributes almost nothing, and its three GEMMs (logits recompute, d_hidden, d_weight) can be skipped.
The forward records the logsumexp of every (forward tile, row); with the row's logsumexp that is the row's
probability mass in the tile. After the rows without gradient are compacted away, a backward row block skips a
tile when every row's mass in it is below `threshold` (2^-12 by default; CCE bounds each element's p by it, a
tile's mass bounds all its elements at once), lightest tiles first, and only as long as no row of the block loses
more than MASS_BUDGET of probability in total; a tile holding a row's label is always kept (the one-hot term).

Error (a bound, per row r): the dropped part of dz_r is g_r·p_rv on the skipped columns, whose total mass is at
most MASS_BUDGET, so d_hidden_r moves by at most |g_r|·Σ_skipped p_rv·‖w_v‖ ≤ |g_r|·MASS_BUDGET·max‖w_v‖, and
d_weight_v by at most Σ_r |g_r|·p_rv·‖h_r‖ over its skipped rows. Against the row's own gradient
|g_r|·‖w_label − E_p[w]‖ that is a few MASS_BUDGET where the label holds most of the mass and the tail's weight
rows are long: measured (tests/ops/test_tile_skip.py, fp32, a steep Zipf stand-in, 54% of the pairs skipped) 4.6e-3
relative for d_hidden and 5e-5 for d_weight, against 3.9e-3 for one bf16 rounding. The per-element rule alone
has no such bound: on a long flat tail (p ∝ rank^-1.1) it would drop over 10% of every row's mass.
An entropy gradient would drop p·|log p + H| per element, ~|ln threshold| + H times more: with one every tile is
computed. On flat logits nothing is skipped.

The plan is built on the host from the kept pairs (one device-to-host copy of RB × T booleans per backward, RB
row blocks, T tiles): slices of consecutive tiles holding at most `capacity` kept pairs (the dz workspace of the
dense path, so memory does not grow), and for each slice the kept pairs in (row block, tile) order with per-row
block offsets (for the dz and d_hidden kernels) and in (tile, row block) order with their slots (for d_weight).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

DEFAULT_THRESHOLD = 2.0 ** -12
# The most probability mass a row may lose to skipped tiles (below one bf16 rounding of its gradient).
MASS_BUDGET = 2.0 ** -9
# Masses are kept in fp16 (half the memory of fp32 between forward and backward), scaled up by this factor first so
# that rounding never makes a tile look lighter (fp16 rounds to within 2^-11 relative above 6e-5, and by at most
# 3e-8 below: 1,187 tiles' worth of that is 4e-5, far under MASS_BUDGET).
FP16_MARGIN = 1.0 + 2.0 ** -10
# Above this kept share the dense path (cuBLAS at ~75-80% of peak for d_hidden and d_weight) beats the sparse
# Triton GEMMs (~60%): bench/roofline.py's break-even is their rate ratio.
SPARSE_MAX_KEPT_SHARE = 0.75


class SliceSpan(NamedTuple):
    """One slice of the sparse backward: vocabulary tiles [tile_begin, tile_end), its kept pairs [pair_begin,
    pair_end) in the plan's pair arrays, and the offsets of its row-block and tile pointer arrays."""

    tile_begin: int
    tile_end: int
    pair_begin: int
    pair_end: int
    row_ptr_begin: int
    col_ptr_begin: int


class TilePlan(NamedTuple):
    """The kept (row block, tile) pairs of a backward (see the module docstring). Device tensors, int32:

    pairs (P, 2) (row block, tile) and tiles (P,) the tile of each, slice by slice in (row block, tile) order;
    row_ptr: per slice RB + 1 slice-local offsets of each row block's pairs; slots, row_blocks (P,): per slice the
    pairs in (tile, row block) order as slice-local pair index and row block; col_ptr: per slice (its tiles + 1)
    slice-local offsets into those. capacity: the most pairs of any slice.
    """

    capacity: int
    spans: list[SliceSpan]
    pairs: torch.Tensor
    tiles: torch.Tensor
    row_ptr: torch.Tensor
    slots: torch.Tensor
    row_blocks: torch.Tensor
    col_ptr: torch.Tensor


def tile_masses(tile_lse: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, block_v: int) -> torch.Tensor:
    """(T, N) fp16: each row's probability mass in each forward tile (rounded up), 1 in its label's tile.

    tile_lse: (T, N) fp32 logsumexp of z = logits / temperature over each tile of block_v columns; lse: (N,) fp32
    logsumexp of z over the vocabulary; labels: (N,) int64.
    """
    masses = (torch.exp(tile_lse - lse[None, :]) * FP16_MARGIN).clamp_max_(1.0).to(torch.float16)
    masses[labels // block_v, torch.arange(labels.shape[0], device=labels.device)] = 1.0
    return masses


def kept_pairs(masses: torch.Tensor, rows: torch.Tensor | None, block_n: int, block_v: int, fwd_block_v: int,
               vocab: int, threshold: float, budget: float = MASS_BUDGET) -> torch.Tensor:
    """(RB, T) bool keep matrix of the backward (see the module docstring).

    masses: (T_f, N) of `tile_masses` over forward tiles of fwd_block_v columns; rows: the backward's rows (int64
    indices in order, None: all), grouped in row blocks of block_n; backward tiles of block_v columns (T =
    ⌈vocab / block_v⌉), one of block_v and fwd_block_v a multiple of the other (a backward tile inside a forward
    tile takes the forward tile's mass, an upper bound; one spanning several takes their sum).
    """
    picked = (masses if rows is None else masses.index_select(1, rows)).float()
    n_fwd, n = picked.shape
    row_blocks = -(-n // block_n)
    tiles = -(-vocab // block_v)
    if block_v <= fwd_block_v:
        assert fwd_block_v % block_v == 0
        per_tile = picked[torch.arange(tiles, device=masses.device) * block_v // fwd_block_v]
    else:
        assert block_v % fwd_block_v == 0
        ratio = block_v // fwd_block_v
        grouped = picked.new_zeros((tiles * ratio, n))
        grouped[:n_fwd] = picked
        per_tile = grouped.view(tiles, ratio, n).sum(dim=1)
    by_row = per_tile.new_zeros((tiles, row_blocks * block_n))
    by_row[:, :n] = per_tile
    by_row = by_row.view(tiles, row_blocks, block_n)
    # Candidates: every row's mass below the threshold; the lightest first, while each row's dropped mass fits.
    heaviest = by_row.amax(dim=2)
    candidate = heaviest < threshold
    order = torch.where(candidate, heaviest, torch.inf).argsort(dim=0, stable=True)
    dropped = by_row.gather(0, order[:, :, None].expand_as(by_row)).cumsum(dim=0)
    fits = (dropped <= budget).all(dim=2) & candidate.gather(0, order)
    skip = torch.zeros_like(candidate).scatter_(0, order, fits.cumprod(dim=0).bool())
    return (~skip).T.contiguous()


def plan(keep: torch.Tensor, capacity: int) -> TilePlan:
    """Slices and pair lists of the kept pairs `keep` (RB, T) bool, at most `capacity` (≥ RB) pairs per slice."""
    row_blocks, n_tiles = keep.shape
    assert capacity >= row_blocks
    host = keep.cpu().numpy()
    per_tile = host.sum(axis=0)
    spans: list[SliceSpan] = []
    pairs, row_ptr, slots, rbs, col_ptr = [], [], [], [], []
    begin, pair_count, row_ptr_len, col_ptr_len = 0, 0, 0, 0
    while begin < n_tiles:
        end, held = begin, 0
        while end < n_tiles and held + per_tile[end] <= capacity:
            held += per_tile[end]
            end += 1
        sub = host[:, begin:end]
        counts = sub.sum(axis=1)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        rank = np.cumsum(sub, axis=1) - 1
        rb_idx, t_idx = np.nonzero(sub)
        t_col, rb_col = np.nonzero(sub.T)
        pairs.append(np.stack([rb_idx, t_idx + begin], axis=1))
        row_ptr.append(offsets)
        slots.append(offsets[rb_col] + rank[rb_col, t_col])
        rbs.append(rb_col)
        col_ptr.append(np.concatenate([[0], np.cumsum(sub.sum(axis=0))]))
        spans.append(SliceSpan(begin, end, pair_count, pair_count + int(held), row_ptr_len, col_ptr_len))
        pair_count += int(held)
        row_ptr_len += row_blocks + 1
        col_ptr_len += end - begin + 1
        begin = end

    def upload(parts: list[np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        flat = np.concatenate(parts).astype(np.int32).reshape(shape)
        return torch.from_numpy(flat).to(keep.device)

    pair_arr = upload(pairs, (-1, 2))
    return TilePlan(capacity=max(s.pair_end - s.pair_begin for s in spans),
                    spans=spans, pairs=pair_arr, tiles=pair_arr[:, 1].contiguous(), row_ptr=upload(row_ptr, (-1,)),
                    slots=upload(slots, (-1,)), row_blocks=upload(rbs, (-1,)), col_ptr=upload(col_ptr, (-1,)))
