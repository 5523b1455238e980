"""The gradient-in-forward policy loss (impl="grad_in_forward"): options, determinism, path choice, errors.

Its numerics against the float64 oracle over every loss option are in tests/loss/test_policy_loss.py.
"""

from __future__ import annotations

import pytest
import torch

from dsrl_fast import PolicyLossConfig, policy_loss
from dsrl_fast.loss import grad_in_forward as gif
from dsrl_fast.loss.policy_loss import _resolve_loss_impl
from tests.conftest import HAS_CUDA, KERNEL_DEVICE
from tests.reference import logprobs_entropy_f64, policy_loss_f64


def make_case(n: int, h: int, v: int, dtype: torch.dtype, device: str = KERNEL_DEVICE):
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) * (3.0 / h**0.5)
    labels = torch.randint(0, v, (n,))
    seq_ids = torch.arange(n) // 5
    advantages = torch.randn(int(seq_ids.max()) + 1)[seq_ids].float()
    mask = torch.rand(n) > 0.25
    return (hidden.to(device, dtype).requires_grad_(), weight.to(device, dtype).requires_grad_(), labels.to(device),
            advantages.to(device), mask.to(device), seq_ids.to(device))


def run(case, cfg: PolicyLossConfig, **kwargs):
    hidden, weight, labels, advantages, mask, seq_ids = case
    out = policy_loss(hidden, weight, labels, advantages, mask=mask, seq_ids=seq_ids, config=cfg,
                      impl="grad_in_forward", **kwargs)
    return out, torch.autograd.grad(out.loss, (hidden, weight))


def oracle(case, cfg: PolicyLossConfig):
    hidden, weight, labels, advantages, mask, seq_ids = case
    h64 = hidden.detach().cpu().double().requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    logp, ent = logprobs_entropy_f64(h64, w64, labels.cpu(), cfg.temperature)
    loss = policy_loss_f64(logp, ent, advantages.cpu(), mask.cpu(), None, None, seq_ids.cpu(), cfg)
    return loss, torch.autograd.grad(loss, (h64, w64)), logp


@pytest.mark.parametrize("weight_grad_fp32", [False, True])
@pytest.mark.parametrize("shape", [(1, 96, 1007), (29, 96, 1007)], ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes_and_weight_grad_dtype(shape: tuple[int, int, int], weight_grad_fp32: bool) -> None:
    n, h, v = shape
    case = make_case(n, h, v, torch.float16)
    cfg = PolicyLossConfig(entropy_coef=0.02, samples="negative" if n > 1 else "all")
    out, (d_hidden, d_weight) = run(case, cfg, workspace_bytes=7 * v * 4, weight_grad_fp32=weight_grad_fp32)
    want, (t_dh, t_dw), logp = oracle(case, cfg)
    assert d_hidden.dtype == torch.float16 and d_weight.dtype == torch.float16
    assert not out.logprobs.requires_grad and not out.entropy.requires_grad
    torch.testing.assert_close(out.logprobs.cpu().double(), logp.detach(), rtol=0, atol=2e-3)
    torch.testing.assert_close(out.loss.detach().cpu().double(), want.detach(), rtol=1e-4, atol=1e-4)
    scale = max(t_dh.abs().max().item(), t_dw.abs().max().item(), 1e-6)
    torch.testing.assert_close(d_hidden.cpu().double() / scale, t_dh / scale, rtol=0, atol=2e-3)
    torch.testing.assert_close(d_weight.cpu().double() / scale, t_dw / scale, rtol=0, atol=2e-3)


def test_rows_without_weight_get_logprobs_but_no_gradient() -> None:
    case = make_case(31, 40, 300, torch.float32)
    hidden, weight, labels, _, mask, _ = case
    out, (d_hidden, _) = run(case, PolicyLossConfig(), workspace_bytes=8 * 300 * 4)
    logp, _ = logprobs_entropy_f64(hidden.detach().cpu(), weight.detach().cpu(), labels.cpu(), 1.0)
    torch.testing.assert_close(out.logprobs.cpu().double(), logp, rtol=0, atol=2e-5)
    assert torch.count_nonzero(d_hidden[~mask]) == 0 and torch.count_nonzero(d_hidden[mask]) > 0


def test_bitwise_deterministic() -> None:
    case = make_case(40, 64, 1007, torch.float16)
    cfg = PolicyLossConfig(entropy_coef=0.01)
    first = run(case, cfg, workspace_bytes=9 * 1007 * 4)[1]
    second = run(case, cfg, workspace_bytes=9 * 1007 * 4)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gradients_are_handed_over_once_and_scaled() -> None:
    case = make_case(12, 32, 200, torch.float32)
    hidden, weight, labels, advantages, mask, _ = case
    out = policy_loss(hidden, weight, labels, advantages, mask=mask, impl="grad_in_forward")
    ref = policy_loss(hidden, weight, labels, advantages, mask=mask, impl="torch")
    (3.0 * out.loss).backward(retain_graph=True)
    want = torch.autograd.grad(3.0 * ref.loss, hidden)[0]
    torch.testing.assert_close(hidden.grad, want, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="hands its precomputed gradients over once"):
        out.loss.backward()


def test_no_grad_computes_values_only() -> None:
    case = make_case(12, 32, 200, torch.float32)
    hidden, weight, labels, advantages, mask, _ = case
    with torch.no_grad():
        out = policy_loss(hidden, weight, labels, advantages, mask=mask, impl="grad_in_forward")
    ref = policy_loss(hidden, weight, labels, advantages, mask=mask, impl="torch")
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-6, atol=1e-7)


def test_budget_rule() -> None:
    v = 151936
    assert gif.chunk_rows(v, 1 << 30) == (1 << 30) // (v * 4)
    assert gif.fits_budget(16384, v, 1 << 30) and not gif.fits_budget(16384, v, 256 << 20)
    assert gif.fits_budget(100, v, 100 * v * 4) and not gif.fits_budget(100, v, 99 * v * 4)


def test_auto_off_cuda_is_torch() -> None:
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    assert _resolve_loss_impl("auto", hidden, weight, None, False) == "torch"
    assert _resolve_loss_impl("grad_in_forward", hidden.to(KERNEL_DEVICE), weight.to(KERNEL_DEVICE), 4096,
                              True) == "grad_in_forward"


@pytest.mark.gpu
def test_auto_on_cuda_picks_by_budget() -> None:
    assert HAS_CUDA
    hidden = torch.randn(2048, 64, device="cuda", requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda", requires_grad=True)
    assert _resolve_loss_impl("auto", hidden, weight, None, False) == "grad_in_forward"
    assert _resolve_loss_impl("auto", hidden, weight, 1000 * 5000 * 4, False) == "triton"
    with torch.no_grad():
        assert _resolve_loss_impl("auto", hidden, weight, None, False) == "triton"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"workspace_bytes": 0}, "workspace_bytes must be a positive int or None, got 0"),
    ({"workspace_bytes": 1.5}, "workspace_bytes must be a positive int or None, got 1.5"),
    ({"weight_grad_fp32": 1}, "weight_grad_fp32 must be a bool, got int"),
    ({"impl": "gif"}, r"impl must be one of \('auto', 'triton', 'grad_in_forward', 'torch'\), got 'gif'"),
])
def test_bad_options_name_the_argument(kwargs: dict, match: str) -> None:
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        policy_loss(hidden, weight, torch.tensor([0, 1, 2, 3]), torch.ones(4), **kwargs)


def test_fp32_weight_grad_accumulation_halves_the_error_over_many_chunks() -> None:
    """d_weight over 12 chunks (the op itself, fp16 under the interpreter; the docstring of GradInForwardOptions
    gives the bf16 figures): accumulated in fp32 it is rounded once, in fp16 once per chunk. rms error against the
    float64 gradient: fp32 accumulation within 1.6× of a single fp16 rounding of the truth (the fp16 dz is rounded
    too; measured 1.44×), and below 0.75× of the fp16-accumulated error (measured 0.63×)."""
    from dsrl_fast.ops.grad_in_forward import GradInForwardOptions, logprobs_and_grads

    chunks, rows, h, v = 12, 8, 64, 1007
    n = chunks * rows
    hidden64 = torch.randn(n, h, dtype=torch.float64)
    weight64 = torch.randn(v, h, dtype=torch.float64) * (3.0 / h**0.5)
    labels = torch.randint(0, v, (n,))
    g_logp = torch.randn(n, dtype=torch.float64)
    hidden, weight = hidden64.half(), weight64.half()
    h64, w64 = hidden.double(), weight.double().requires_grad_()
    truth = torch.autograd.grad((logprobs_entropy_f64(h64, w64, labels, 1.0)[0] * g_logp).sum(), w64)[0]

    def token_grad(idx, logp, entropy):
        return g_logp[idx.cpu()].float().to(logp.device), None

    def rms_error(weight_grad_fp32: bool) -> float:
        options = GradInForwardOptions(with_entropy=False, chunk_rows=rows, weight_grad_fp32=weight_grad_fp32)
        d_weight = logprobs_and_grads(hidden.to(KERNEL_DEVICE), weight.to(KERNEL_DEVICE), labels.to(KERNEL_DEVICE),
                                      token_grad, options, None, compute_dh=False, compute_dw=True).d_weight
        assert d_weight is not None and d_weight.dtype == torch.float16
        return float((d_weight.cpu().double() - truth).pow(2).mean().sqrt() / truth.pow(2).mean().sqrt())

    one_rounding = float((truth.half().double() - truth).pow(2).mean().sqrt() / truth.pow(2).mean().sqrt())
    fp32, fp16 = rms_error(True), rms_error(False)
    assert fp32 <= 1.6 * one_rounding and fp32 < 0.75 * fp16, (fp32, fp16, one_rounding)


# Tensor methods that wait for the device: reads to the host (nonzero needs its result's size there) and copies of
# host data into a new device tensor (from pageable memory CUDA synchronizes the stream first).
_SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "new_tensor")


def _syncs(monkeypatch: pytest.MonkeyPatch, fn) -> int:
    """Calls of the syncing tensor methods and of torch.tensor / torch.as_tensor while `fn` runs. A stand-in for
    CUDA's sync counter (torch.cuda.set_sync_debug_mode needs a GPU): on CPU nothing waits, so this counts the calls
    a GPU run would wait on."""
    count = 0

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            nonlocal count
            count += 1
            return original(self, *args, **kwargs)

        return wrapper

    def counting_factory(original):
        def wrapper(*args, **kwargs):
            nonlocal count
            count += 1
            return original(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in _SYNCING:
            patch.setattr(torch.Tensor, name, counting(name))
        for name in ("tensor", "as_tensor"):
            patch.setattr(torch, name, counting_factory(getattr(torch, name)))
        fn()
    return count


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("norm_tokens", [None, 40])
def test_host_syncs_do_not_grow_with_the_number_of_chunks(monkeypatch: pytest.MonkeyPatch, agg: str,
                                                          norm_tokens: int | None) -> None:
    """One chunk or ten: the same number of device syncs (none inside the chunk loop)."""
    torch.manual_seed(7)
    case = make_case(80, 32, 257, torch.float32)
    cfg = PolicyLossConfig(agg=agg, norm_tokens=norm_tokens if agg == "token-mean" else None, samples="negative")
    counts = {}
    for chunks in (1, 10):
        workspace = 257 * 4 * (80 // chunks)
        counts[chunks] = _syncs(monkeypatch, lambda: run(case, cfg, workspace_bytes=workspace))
    assert counts[10] == counts[1], counts


def test_the_sync_counter_sees_a_sync_in_the_chunk_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter above is not blind: a .item() planted in the per-chunk gradient shows up once per chunk that holds
    rows with a gradient (the negative samples' rows compacted into 8-row chunks: more than one chunk)."""
    torch.manual_seed(7)
    case = make_case(80, 32, 257, torch.float32)
    real = gif.token_loss_terms

    def syncing(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0].item()
        return out

    monkeypatch.setattr(gif, "token_loss_terms", syncing)
    cfg = PolicyLossConfig(samples="negative")
    one = _syncs(monkeypatch, lambda: run(case, cfg, workspace_bytes=257 * 4 * 80))
    ten = _syncs(monkeypatch, lambda: run(case, cfg, workspace_bytes=257 * 4 * 8))
    assert ten - one >= 2, (one, ten)
