"""Vocabulary-tile skipping in the fused log-prob backward (dsrl_fast/ops/tile_skip.py, kernels/sparse_grads.py).

No trained model can be loaded here, so peaked logits come from stand-ins (bench/standin_lm.py): a small
next-token model trained for ~100 steps on the MATH500 problems and solutions (a BPE vocabulary of 512
frequency-ordered ids; entropy ~3.8 nats, a flat tail: within the mass budget it skips nothing), and Zipf-shaped
logits with a steep tail (p ∝ rank^-2 plus a context term of std 1: entropy ~1.7 nats, top-1 p ~0.55, as an LM
sampling at temperature 1; 16×16 tiles over V = 2000 skip ~2/3 of the pairs) or a flat one (rank^-1.1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.standin_lm import BENCHMARKS, LmRows, math500_texts, trained_lm, zipf_logits
from dsrl_fast.kernels.linear_logprobs import KernelConfig
from dsrl_fast.ops import linear_logprobs as op
from dsrl_fast.ops import tile_skip
from tests.conftest import KERNEL_DEVICE
from tests.reference import logprobs_entropy_f64

SMALL_TILES = KernelConfig(block_n=16, block_v=16, block_h=32, num_warps=1, num_stages=1)
FORWARD_TILES = KernelConfig(block_n=16, block_v=32, block_h=32, num_warps=1, num_stages=1)


@pytest.fixture(scope="module")
def lm_rows(one_torch_thread: None) -> LmRows:
    if not (BENCHMARKS / "math500" / "test.jsonl").is_file():
        pytest.skip(f"the stand-in LM trains on MATH500, not found at {BENCHMARKS} (shared data folder missing)")
    return trained_lm(math500_texts(), vocab_size=512, hidden=64, steps=100, rows=128)


def _grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, g_logp: torch.Tensor,
           g_ent: torch.Tensor | None, options: op.FusedOptions) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp, ent = op.TritonLinearLogprobs.apply(h, w, labels, options)
    objective = (logp * g_logp).sum() + ((ent * g_ent).sum() if g_ent is not None else 0.0)
    return torch.autograd.grad(objective, (h, w))


def _truth(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, g_logp: torch.Tensor,
           g_ent: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    h64 = hidden.detach().cpu().double().requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    logp, ent = logprobs_entropy_f64(h64, w64, labels.cpu(), 1.0)
    objective = (logp * g_logp.cpu().double()).sum()
    if g_ent is not None:
        objective = objective + (ent * g_ent.cpu().double()).sum()
    return torch.autograd.grad(objective, (h64, w64))


def _keep_matrix(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, threshold: float,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """The op's own keep matrix: forward tile logsumexps from the kernel, then tile_skip's reductions."""
    from dsrl_fast.kernels import linear_logprobs as kernels

    tiles = -(-weight.shape[0] // FORWARD_TILES.block_v)
    tile_lse = torch.empty((tiles, hidden.shape[0]), device=hidden.device)
    partials = kernels.forward_partials(hidden, weight, labels, 1.0, False, FORWARD_TILES, tile_lse=tile_lse)
    lse = kernels.combine_partials(partials)[0]
    masses = tile_skip.tile_masses(tile_lse, lse, labels, FORWARD_TILES.block_v)
    return tile_skip.kept_pairs(masses, rows, SMALL_TILES.block_n, SMALL_TILES.block_v, FORWARD_TILES.block_v,
                                weight.shape[0], threshold)


def test_plan_lists_cover_every_kept_pair_once() -> None:
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(5, 13, generator=gen) < 0.4
    keep[:, 3] = True  # one tile every row block keeps
    plan = tile_skip.plan(keep, capacity=7)
    pairs = plan.pairs.numpy()
    seen: list[tuple[int, int]] = []
    assert plan.spans[0].tile_begin == 0 and plan.spans[-1].tile_end == 13
    for span, following in zip(plan.spans, plan.spans[1:] + [None]):
        assert following is None or following.tile_begin == span.tile_end
        local = pairs[span.pair_begin:span.pair_end]
        assert len(local) <= 7 and plan.capacity >= len(local)
        assert [tuple(p) for p in local] == sorted(tuple(p) for p in local)  # (row block, tile) order
        row_ptr = plan.row_ptr.numpy()[span.row_ptr_begin:span.row_ptr_begin + 6]
        for b in range(5):
            assert all(p[0] == b for p in local[row_ptr[b]:row_ptr[b + 1]])
        n_tiles = span.tile_end - span.tile_begin
        col_ptr = plan.col_ptr.numpy()[span.col_ptr_begin:span.col_ptr_begin + n_tiles + 1]
        slots = plan.slots.numpy()[span.pair_begin:span.pair_end]
        rbs = plan.row_blocks.numpy()[span.pair_begin:span.pair_end]
        for t in range(n_tiles):
            for j in range(col_ptr[t], col_ptr[t + 1]):
                assert tuple(local[slots[j]]) == (rbs[j], span.tile_begin + t)
        seen += [tuple(p) for p in local]
    assert sorted(seen) == sorted(map(tuple, np.argwhere(keep.numpy())))
    assert torch.equal(plan.tiles, plan.pairs[:, 1])


@pytest.mark.parametrize(("block_v", "fwd_block_v"), [(16, 32), (32, 16), (16, 16)])
def test_kept_pairs_follow_the_rule(block_v: int, fwd_block_v: int) -> None:
    """Against a loop over row blocks: a pair is skipped only if every row's mass in the tile is below the
    threshold, no row loses more than the budget in total, and the skipped tiles are the lightest candidates."""
    gen = torch.Generator().manual_seed(2)
    vocab, n, block_n, threshold, budget = 100, 23, 4, 0.02, 0.05
    fwd_tiles = -(-vocab // fwd_block_v)
    masses = (torch.rand(fwd_tiles, n, generator=gen) ** 4 * 0.05).half()
    rows = torch.tensor([0, 2, 3, 5, 8, 9, 13, 14, 20, 22])
    keep = tile_skip.kept_pairs(masses, rows, block_n, block_v, fwd_block_v, vocab, threshold, budget)
    tiles = -(-vocab // block_v)
    assert keep.shape == (-(-len(rows) // block_n), tiles) and not bool(keep.all()) and bool(keep.any())
    picked = masses.float()[:, rows]
    for b in range(keep.shape[0]):
        members = range(b * block_n, min((b + 1) * block_n, len(rows)))
        mass = torch.zeros(tiles, len(members))
        for t in range(tiles):
            fwd = sorted({c // fwd_block_v for c in range(t * block_v, min((t + 1) * block_v, vocab))})
            mass[t] = picked[fwd][:, list(members)].sum(0) if block_v > fwd_block_v else picked[fwd[0], list(members)]
        skipped = ~keep[b]
        assert bool((mass[skipped] < threshold).all())
        assert bool((mass[skipped].sum(0) <= budget + 1e-6).all())
        candidates = (mass < threshold).all(1) & ~skipped
        if skipped.any() and candidates.any():  # a lighter candidate is never left while a heavier one is skipped
            assert mass[skipped].amax(1).max() <= mass[candidates].amax(1).min() + 1e-6


@pytest.mark.parametrize("stand_in", ["trained", "zipf2"])
def test_skipped_pairs_are_light(stand_in: str, lm_rows: LmRows) -> None:
    """Every skipped (row block, tile) holds < 2^-12 of each row's probability (float64 softmax) and no label, and
    each row loses at most MASS_BUDGET in total; the steep Zipf skips most pairs, the trained stand-in few."""
    rows = lm_rows if stand_in == "trained" else zipf_logits(96, 32, 2000, context_std=1.0, exponent=2.0)
    hidden, weight, labels = (t.to(KERNEL_DEVICE) for t in rows)
    keep = _keep_matrix(hidden, weight, labels, tile_skip.DEFAULT_THRESHOLD).cpu()
    p = torch.softmax(rows.hidden.double() @ rows.weight.double().T, dim=-1)
    n, vocab = p.shape
    assert float(keep.float().mean()) < (0.5 if stand_in == "zipf2" else 1.0 + 1e-9)
    dropped = torch.zeros(n, dtype=torch.float64)
    for b, t in torch.nonzero(~keep).tolist():
        block = p[b * 16:(b + 1) * 16, t * 16:min((t + 1) * 16, vocab)].sum(1)
        assert block.max() < tile_skip.DEFAULT_THRESHOLD, (b, t, float(block.max()))
        assert not ((rows.labels[b * 16:(b + 1) * 16] // 16) == t).any()
        dropped[b * 16:(b + 1) * 16] += block
    assert dropped.max() <= tile_skip.MASS_BUDGET


def test_a_long_flat_tail_is_not_dropped() -> None:
    """A Zipf stand-in with a weak context term (V = 2000): ~1,700 tokens each just under 2^-12 carry ~20% of the
    mass. The per-element rule alone would drop them; the budget keeps what a row may lose under 2^-9."""
    hidden, weight, labels = (t.to(KERNEL_DEVICE) for t in zipf_logits(32, 32, 2000, context_std=0.3))
    keep = _keep_matrix(hidden, weight, labels, tile_skip.DEFAULT_THRESHOLD).cpu()
    p = torch.softmax(hidden.cpu().double() @ weight.cpu().double().T, dim=-1)
    skipped_cols = ~keep.repeat_interleave(16, 1)[:, :2000].repeat_interleave(16, 0)[:32]
    per_element = (p < tile_skip.DEFAULT_THRESHOLD)
    assert float((p * per_element).sum(1).min()) > 0.1  # what the per-element rule would drop
    assert float((p * skipped_cols).sum(1).max()) <= tile_skip.MASS_BUDGET


def test_flat_logits_skip_nothing_and_match_the_dense_path_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat logits over 1,007 tokens (p ≈ 1e-3 > 2^-12 everywhere): no pair is skipped, and the gradients equal
    those with skipping off, bit for bit (the dense path runs at a kept share of 1 even where the sparse one may)."""
    hidden = torch.randn(20, 32, device=KERNEL_DEVICE)
    weight = torch.randn(1007, 32, device=KERNEL_DEVICE) * 0.01
    labels = torch.randint(0, 1007, (20,), device=KERNEL_DEVICE)
    keep = _keep_matrix(hidden, weight, labels, tile_skip.DEFAULT_THRESHOLD)
    assert bool(keep.all())
    g = torch.randn(20, device=KERNEL_DEVICE)
    monkeypatch.setattr(tile_skip, "SPARSE_MAX_KEPT_SHARE", 1.0)
    base = op.FusedOptions(forward_config=FORWARD_TILES, dlogits_config=SMALL_TILES)
    on = _grads(hidden, weight, labels, g, None, base)
    off = _grads(hidden, weight, labels, g, None, op.FusedOptions(**{**base.__dict__, "skip_threshold": None}))
    assert all(torch.equal(a, b) for a, b in zip(on, off))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sparse_kernels_with_every_tile_kept_give_the_exact_gradient(dtype: torch.dtype) -> None:
    """The sparse backward on a plan that keeps every pair must be the exact gradient: row and vocabulary tails
    (37 rows, V = 1007, 4 pairs per slice so many slices), fp16 through TMA descriptors, fp32 through pointers;
    and it must agree with the dense path."""
    hidden = torch.randn(37, 48, dtype=torch.float64)
    weight = torch.randn(1007, 48, dtype=torch.float64) * (3.0 / 48**0.5)
    labels = torch.randint(0, 1007, (37,))
    g_logp = torch.randn(37)
    h, w = hidden.to(KERNEL_DEVICE, dtype), weight.to(KERNEL_DEVICE, dtype)
    lse = torch.logsumexp(h.double() @ w.double().T, dim=1).float()
    x = op.BackwardInputs(hidden=h, weight=w, labels=labels.to(KERNEL_DEVICE), lse=lse,
                          g_logp=g_logp.to(KERNEL_DEVICE), entropy=None, g_ent=None)
    options = op.FusedOptions(dlogits_config=SMALL_TILES, slice_width=64)
    keep = torch.ones(3, 63, dtype=torch.bool, device=KERNEL_DEVICE)
    plan = tile_skip.plan(keep, capacity=6)
    assert len(plan.spans) == 32
    d_hidden = torch.zeros(37, 48, device=KERNEL_DEVICE)
    d_weight = torch.empty(1007, 48, device=KERNEL_DEVICE, dtype=dtype)
    op.sparse_grads_of(x, options, plan, d_hidden, d_weight)
    dense_h = torch.zeros(37, 48, device=KERNEL_DEVICE)
    dense_w = torch.empty(1007, 48, device=KERNEL_DEVICE, dtype=dtype)
    op.dense_grads(x, options, dense_h, dense_w)
    t_dh, t_dw = _truth(h, w, labels, g_logp, None)
    scale = max(t_dh.abs().max().item(), t_dw.abs().max().item())
    atol = 2e-5 if dtype == torch.float32 else 2e-3
    for ours in ((d_hidden, d_weight), (dense_h, dense_w)):
        torch.testing.assert_close(ours[0].cpu().double() / scale, t_dh / scale, rtol=0, atol=atol)
        torch.testing.assert_close(ours[1].cpu().double() / scale, t_dw / scale, rtol=0, atol=atol)


def test_rows_without_gradient_are_compacted_before_the_sparse_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the autograd function on peaked logits (the steep Zipf stand-in; skipping happens): rows with zero
    gradient get zero d_hidden and never reach the dz kernel; the error stays at the level of the bound test."""
    from dsrl_fast.kernels import linear_logprobs as kernels

    rows_seen: list[int] = []
    launch = kernels.dlogits
    monkeypatch.setattr(kernels, "dlogits", lambda *a, **k: (rows_seen.append(a[0].shape[0]), launch(*a, **k)))
    hidden, weight, labels = (t.to(KERNEL_DEVICE) for t in zipf_logits(40, 32, 2000, context_std=1.0,
                                                                           exponent=2.0))
    g = torch.randn(40, device=KERNEL_DEVICE)
    g[::3] = 0.0
    options = op.FusedOptions(forward_config=FORWARD_TILES, dlogits_config=SMALL_TILES)
    d_hidden, d_weight = _grads(hidden, weight, labels, g, None, options)
    assert rows_seen and set(rows_seen) == {26}
    assert torch.count_nonzero(d_hidden[::3]) == 0
    t_dh, t_dw = _truth(hidden, weight, labels, g.cpu(), None)
    rel = float((d_hidden.cpu().double() - t_dh).norm() / t_dh.norm())
    assert rel < 8e-3, rel


def test_skipping_error_is_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 (the only error is what skipping drops), the steep Zipf stand-in (54% of the 16×16 pairs skipped):
    |d_hidden - truth| per row within |g_r|·Σ_skipped p·‖w_v‖ (tile_skip's docstring) plus fp32 noise, d_weight
    likewise per vocabulary row; relative errors measured 4.6e-3 (d_hidden) and 5e-5 (d_weight), budgets 8e-3
    and 1e-3 (one bf16 rounding is 3.9e-3)."""
    rows = zipf_logits(96, 32, 2000, context_std=1.0, exponent=2.0)
    hidden, weight, labels = (t.to(KERNEL_DEVICE) for t in rows)
    n = hidden.shape[0]
    g_logp = torch.randn(n, generator=torch.Generator().manual_seed(3))
    options = op.FusedOptions(forward_config=FORWARD_TILES, dlogits_config=SMALL_TILES, slice_width=256)
    d_hidden, d_weight = _grads(hidden, weight, labels, g_logp.to(KERNEL_DEVICE), None, options)
    t_dh, t_dw = _truth(hidden, weight, labels, g_logp, None)

    keep = _keep_matrix(hidden, weight, labels, tile_skip.DEFAULT_THRESHOLD).cpu()
    skipped = ~keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :weight.shape[0]]
    p = torch.softmax(rows.hidden.double() @ rows.weight.double().T, dim=-1)
    drop = g_logp.abs().double()[:, None] * p * skipped  # |dz| of each dropped element
    bound_dh = (drop * rows.weight.double().norm(dim=1)[None, :]).sum(1)
    bound_dw = (drop * rows.hidden.double().norm(dim=1)[:, None]).sum(0)
    noise = 1e-5 * max(t_dh.abs().max().item(), t_dw.abs().max().item())
    err_dh = (d_hidden.cpu().double() - t_dh).norm(dim=1)
    err_dw = (d_weight.cpu().double() - t_dw).norm(dim=1)
    assert float(skipped.double().mean()) > 0.4
    assert bool((err_dh <= bound_dh + noise).all()), float((err_dh - bound_dh).max())
    assert bool((err_dw <= bound_dw + noise).all()), float((err_dw - bound_dw).max())
    rel_dh, rel_dw = float(err_dh.norm() / t_dh.norm()), float(err_dw.norm() / t_dw.norm())
    assert rel_dh < 8e-3 and rel_dw < 1e-3, (float(keep.float().mean()), rel_dh, rel_dw)


def test_an_entropy_gradient_turns_skipping_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its dropped part is ~|ln threshold| + H times larger (measured 9e-3 relative on the stand-in): with an
    entropy gradient the dense path runs and the gradients equal those with skipping off, bit for bit, on peaked
    logits (the Zipf stand-in of bench/standin_lm.py) whose tail tiles would otherwise be skipped."""
    monkeypatch.setattr(tile_skip, "SPARSE_MAX_KEPT_SHARE", 1.0)
    planned: list[int] = []
    plan = tile_skip.plan
    monkeypatch.setattr(tile_skip, "plan", lambda *a, **k: (planned.append(1), plan(*a, **k))[1])
    rows = zipf_logits(32, 32, 1000, context_std=1.0, exponent=2.0)
    hidden, weight, labels = (t.to(KERNEL_DEVICE) for t in rows)
    assert not bool(_keep_matrix(hidden, weight, labels, tile_skip.DEFAULT_THRESHOLD).all())
    g = torch.randn(32, device=KERNEL_DEVICE)
    base = op.FusedOptions(with_entropy=True, forward_config=FORWARD_TILES, dlogits_config=SMALL_TILES)
    on = _grads(hidden, weight, labels, g, 0.5 * g, base)
    off = _grads(hidden, weight, labels, g, 0.5 * g, op.FusedOptions(**{**base.__dict__, "skip_threshold": None}))
    assert not planned and all(torch.equal(a, b) for a, b in zip(on, off))
    _grads(hidden, weight, labels, g, None, base)
    assert planned, "without the entropy gradient these logits are skipped"


def test_sparse_backward_is_bitwise_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tile_skip, "SPARSE_MAX_KEPT_SHARE", 1.0)
    hidden = torch.randn(45, 32, device=KERNEL_DEVICE, dtype=torch.float16)
    weight = (torch.randn(300, 32, device=KERNEL_DEVICE) * 0.8).to(torch.float16)
    labels = torch.randint(0, 300, (45,), device=KERNEL_DEVICE)
    g = torch.randn(45, device=KERNEL_DEVICE)
    options = op.FusedOptions(forward_config=FORWARD_TILES, dlogits_config=SMALL_TILES, slice_width=64)
    first = _grads(hidden, weight, labels, g, None, options)
    second = _grads(hidden, weight, labels, g, None, options)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_threshold_is_two_to_the_minus_twelve() -> None:
    assert tile_skip.DEFAULT_THRESHOLD == 2.0**-12 and op.FusedOptions().skip_threshold == 2.0**-12
    assert math.isclose(math.log2(tile_skip.DEFAULT_THRESHOLD), -12)


@pytest.mark.gpu
def test_sparse_kernels_in_bf16_on_gpu() -> None:
    """bf16 through wgmma and TMA (the interpreter cannot run bf16): the sparse backward with every pair kept
    against float64, within the dense path's own bf16 error plus 2e-2 of the largest gradient."""
    n, h, v = 1000, 256, 32000 + 7
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) * (3.0 / h**0.5)
    labels = torch.randint(0, v, (n,))
    g_logp = torch.randn(n)
    hb, wb = hidden.cuda().bfloat16(), weight.cuda().bfloat16()
    lse = torch.logsumexp(hb.double() @ wb.double().T, dim=1).float()
    x = op.BackwardInputs(hidden=hb, weight=wb, labels=labels.cuda(), lse=lse, g_logp=g_logp.cuda(), entropy=None,
                          g_ent=None)
    from dsrl_fast.kernels.fused_tiles import DLOGITS_CONFIG as cfg

    keep = torch.ones(-(-n // cfg.block_n), -(-v // cfg.block_v), dtype=torch.bool, device="cuda")
    plan = tile_skip.plan(keep, capacity=keep.shape[0] * 13)
    sparse_h, sparse_w = torch.zeros(n, h, device="cuda"), torch.empty_like(wb)
    op.sparse_grads_of(x, op.FusedOptions(), plan, sparse_h, sparse_w)
    dense_h, dense_w = torch.zeros(n, h, device="cuda"), torch.empty_like(wb)
    op.dense_grads(x, op.FusedOptions(), dense_h, dense_w)
    t_dh, t_dw = _truth(hb, wb, labels, g_logp, None)
    scale = max(t_dh.abs().max().item(), t_dw.abs().max().item())
    for name, ours, dense, truth in (("d_hidden", sparse_h, dense_h, t_dh), ("d_weight", sparse_w, dense_w, t_dw)):
        err = (ours.cpu().double() - truth).abs().max().item() / scale
        dense_err = (dense.cpu().double() - truth).abs().max().item() / scale
        assert err <= 2 * dense_err + 2e-2, (name, err, dense_err)


@pytest.mark.parametrize("threshold", [None, 2.0**-12, 2.0**-10])
def test_the_loss_config_sets_the_threshold(monkeypatch: pytest.MonkeyPatch, threshold: float | None) -> None:
    """PolicyLossConfig.skip_threshold reaches the fused op's options on the Triton path (None: no skipping)."""
    from dsrl_fast import PolicyLossConfig, policy_loss

    seen: list[op.FusedOptions] = []
    real = op.TritonLinearLogprobs.apply

    def spy(hidden, weight, labels, options):
        seen.append(options)
        return real(hidden, weight, labels, options)

    monkeypatch.setattr(op.TritonLinearLogprobs, "apply", spy)
    hidden = torch.randn(6, 32, requires_grad=True)
    weight = torch.randn(130, 32)
    policy_loss(hidden, weight, torch.randint(0, 130, (6,)), torch.randn(6), impl="triton",
                config=PolicyLossConfig(skip_threshold=threshold)).loss.backward()
    assert [o.skip_threshold for o in seen] == [threshold]


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-3])
def test_a_bad_threshold_names_the_option(bad: float) -> None:
    from dsrl_fast import PolicyLossConfig

    with pytest.raises(ValueError, match=r"skip_threshold must be in \(0, 1\) or None, got"):
        PolicyLossConfig(skip_threshold=bad)
