"""linear_logprobs (Triton under the interpreter on CPU, and the PyTorch path) against float64 truth."""

from __future__ import annotations

import pytest
import torch

from dsrl_fast import linear_logprobs
from tests.conftest import KERNEL_DEVICE
from tests.numerics import assert_within_budget
from tests.reference import logprobs_entropy_f64

# Absolute error budgets on top of 2× PyTorch's own error at the input dtype. Gradients are compared after
# scaling by their largest magnitude.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

SHAPES = [(1, 96, 1007), (37, 96, 1007), (70, 40, 300)]


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str = "cpu"):
    # Peaked logits (std of z around 3), not a flat softmax.
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) * (3.0 / h**0.5)
    labels = torch.randint(0, v, (n,))
    return (hidden.to(device=device, dtype=dtype).requires_grad_(), weight.to(device=device, dtype=dtype)
            .requires_grad_(), labels.to(device))


def peer_logprobs(hidden, weight, labels, temperature):
    """Plain PyTorch at the input dtype (materialized logits): the error yardstick."""
    logits = (hidden @ weight.T).float() / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(1, labels[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1)


def run_case(impl: str, dtype: torch.dtype, shape: tuple[int, int, int], temperature: float, with_entropy: bool,
             device: str) -> None:
    n, h, v = shape
    hidden, weight, labels = make_inputs(n, h, v, dtype, device)
    g_logp = torch.randn(n, dtype=torch.float64)
    g_ent = torch.randn(n, dtype=torch.float64)
    g_logp[: n // 3] = 0.0  # rows with zero gradient take the skip path

    out = linear_logprobs(hidden, weight, labels, temperature=temperature, with_entropy=with_entropy, impl=impl)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (n,)
    assert (out.entropy is not None) == with_entropy
    objective = (out.logprobs.double().cpu() * g_logp).sum()
    if with_entropy:
        objective = objective + (out.entropy.double().cpu() * g_ent).sum()
    d_hidden, d_weight = torch.autograd.grad(objective, (hidden, weight))

    h64 = hidden.detach().cpu().double().requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    logp64, ent64 = logprobs_entropy_f64(h64, w64, labels.cpu(), temperature)
    truth = (logp64 * g_logp).sum() + ((ent64 * g_ent).sum() if with_entropy else 0.0)
    t_dh, t_dw = torch.autograd.grad(truth, (h64, w64))

    hp, wp = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    p_logp, p_ent = peer_logprobs(hp, wp, labels, temperature)
    peer_obj = (p_logp.double().cpu() * g_logp).sum() + ((p_ent.double().cpu() * g_ent).sum() if with_entropy else 0)
    p_dh, p_dw = torch.autograd.grad(peer_obj, (hp, wp))

    atol = ATOL[dtype]
    assert_within_budget("logprobs", out.logprobs.cpu(), p_logp.cpu(), logp64, atol=atol)
    if with_entropy:
        assert_within_budget("entropy", out.entropy.cpu(), p_ent.cpu(), ent64, atol=atol)
    for name, ours, peer, ref in (("d_hidden", d_hidden, p_dh, t_dh), ("d_weight", d_weight, p_dw, t_dw)):
        scale = ref.abs().max().clamp_min(1e-12)
        assert_within_budget(name, ours.cpu() / scale, peer.cpu() / scale, ref / scale, atol=atol)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_values_and_gradients(impl: str, dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    device = KERNEL_DEVICE if impl == "triton" else "cpu"
    run_case(impl, dtype, shape, temperature=1.0, with_entropy=True, device=device)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_temperature(impl: str, with_entropy: bool) -> None:
    device = KERNEL_DEVICE if impl == "triton" else "cpu"
    run_case(impl, torch.float32, (23, 64, 515), temperature=0.6, with_entropy=with_entropy, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 96, 1007), (300, 256, 5000), (1024, 2560, 32000 + 7)])
def test_bf16_on_gpu(shape: tuple[int, int, int]) -> None:
    run_case("triton", torch.bfloat16, shape, temperature=1.0, with_entropy=True, device="cuda")


def test_vocabulary_splits_agree() -> None:
    """The forward's vocabulary splits merge to the same statistics whatever their number."""
    from dsrl_fast.kernels import linear_logprobs as kernels

    hidden, weight, labels = make_inputs(19, 48, 777, torch.float32, KERNEL_DEVICE)
    results = [kernels.combine_partials(kernels.forward_partials(hidden.detach(), weight.detach(), labels, 1.0, True,
                                                                 splits=s)) for s in (1, 2, 4)]
    for lse, label_logit, entropy in results[1:]:
        torch.testing.assert_close(lse, results[0][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(label_logit, results[0][1], rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy, results[0][2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_non_contiguous_hidden(impl: str) -> None:
    device = KERNEL_DEVICE if impl == "triton" else "cpu"
    base = torch.randn(30, 2, 64, device=device)
    hidden = base[:, 1, :]  # row stride 128
    weight = torch.randn(301, 64, device=device) * 0.3
    labels = torch.randint(0, 301, (30,), device=device)
    got = linear_logprobs(hidden, weight, labels, impl=impl).logprobs
    want, _ = logprobs_entropy_f64(hidden.cpu(), weight.cpu(), labels.cpu(), 1.0)
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_empty_input(impl: str) -> None:
    device = KERNEL_DEVICE if impl == "triton" else "cpu"
    hidden = torch.randn(0, 32, device=device, requires_grad=True)
    weight = torch.randn(50, 32, device=device, requires_grad=True)
    out = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.int64, device=device), impl=impl)
    assert out.logprobs.shape == (0,)
    out.logprobs.sum().backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": torch.randn(4, 8, 2)}, "hidden must have 2 dims"),
        ({"weight": torch.randn(10, 9)}, r"weight must have shape \(V, 8\)"),
        ({"weight": torch.randn(10, 8, dtype=torch.float16)}, "weight must have hidden's dtype"),
        ({"labels": torch.tensor([0, 1, 2, 10])}, r"labels must lie in \[0, 10\).*\[0, 10\]"),
        ({"labels": torch.tensor([0, -1, 2, 3])}, r"labels must lie in \[0, 10\).*\[-1, 3\]"),
        ({"labels": torch.tensor([0, 1, 2])}, r"labels must have shape \(4,\)"),
        ({"labels": torch.tensor([0, 1, 2, 3], dtype=torch.int32)}, "labels must have dtype in"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
        ({"impl": "cuda"}, r"impl must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, match: str) -> None:
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(10, 8), "labels": torch.tensor([0, 1, 2, 3])}
    options = {k: kwargs.pop(k) for k in ("temperature", "impl") if k in kwargs}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_logprobs(args["hidden"], args["weight"], args["labels"], **options)


def _fused_grads(hidden, weight, labels, g_logp, g_ent, options):
    from dsrl_fast.ops.linear_logprobs import TritonLinearLogprobs

    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp, ent = TritonLinearLogprobs.apply(h, w, labels, options)
    objective = (logp * g_logp).sum() + ((ent * g_ent).sum() if g_ent is not None else 0.0)
    return torch.autograd.grad(objective, (h, w))


def _assert_matches_float64(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, g_logp: torch.Tensor,
                            g_ent: torch.Tensor, d_hidden: torch.Tensor, d_weight: torch.Tensor) -> None:
    """Fused fp32 gradients of Σ g_logp·logp + g_ent·entropy against the float64 truth, within 2e-5 of the largest
    gradient element (fp32 accumulation over V ≈ 10³ columns)."""
    h64 = hidden.detach().cpu().double().requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    logp64, ent64 = logprobs_entropy_f64(h64, w64, labels.cpu(), 1.0)
    t_dh, t_dw = torch.autograd.grad((logp64 * g_logp).sum() + (ent64 * g_ent).sum(), (h64, w64))
    scale = max(t_dh.abs().max().item(), t_dw.abs().max().item())
    torch.testing.assert_close(d_hidden.cpu().double() / scale, t_dh / scale, rtol=0, atol=2e-5)
    torch.testing.assert_close(d_weight.cpu().double() / scale, t_dw / scale, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_is_bitwise_deterministic(dtype: torch.dtype) -> None:
    """No atomics anywhere: two backward passes give bitwise-identical gradients (slices of 128 columns)."""
    from dsrl_fast.ops.linear_logprobs import FusedOptions

    hidden, weight, labels = make_inputs(45, 96, 1007, dtype, KERNEL_DEVICE)
    g_logp = torch.randn(45, device=KERNEL_DEVICE)
    g_logp[::4] = 0.0
    g_ent = torch.randn(45, device=KERNEL_DEVICE)
    options = FusedOptions(with_entropy=True, slice_width=128)
    first = _fused_grads(hidden, weight, labels, g_logp, g_ent, options)
    second = _fused_grads(hidden, weight, labels, g_logp, g_ent, options)
    for a, b in zip(first, second):
        assert a.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("slice_width", [128, 384, 1024])
def test_slice_width_does_not_change_gradients(slice_width: int) -> None:
    """Slices crossing the vocabulary tail (1007 = 7·128 + 111) agree with the float64 truth at any width."""
    from dsrl_fast.ops.linear_logprobs import FusedOptions

    hidden, weight, labels = make_inputs(21, 96, 1007, torch.float32, KERNEL_DEVICE)
    g_logp = torch.randn(21, dtype=torch.float64)
    g_ent = torch.randn(21, dtype=torch.float64)
    d_hidden, d_weight = _fused_grads(hidden, weight, labels, g_logp.float().to(KERNEL_DEVICE),
                                      g_ent.float().to(KERNEL_DEVICE),
                                      FusedOptions(with_entropy=True, slice_width=slice_width))
    _assert_matches_float64(hidden, weight, labels, g_logp, g_ent, d_hidden, d_weight)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_entropy_gradient_variant_runs_only_when_used(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autograd hands None (not zeros) for an unused entropy output, so the cheaper backward runs."""
    from dsrl_fast.kernels import linear_logprobs as kernels

    device = KERNEL_DEVICE if impl == "triton" else "cpu"
    seen: list[bool] = []
    launch = kernels.dlogits

    def spy(*args, **kwargs):
        seen.append(args[6] is not None)
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernels, "dlogits", spy)
    hidden, weight, labels = make_inputs(9, 32, 300, torch.float32, device)
    out = linear_logprobs(hidden, weight, labels, with_entropy=True, impl=impl)
    d_unused = torch.autograd.grad(out.logprobs.sum(), (hidden, weight), retain_graph=True)
    d_used = torch.autograd.grad(out.logprobs.sum() + 0.0 * out.entropy.sum(), (hidden, weight))
    for a, b in zip(d_unused, d_used):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if impl == "triton":
        assert seen and seen[0] is False and seen[-1] is True and len(set(seen)) == 2, seen


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_all_rows_without_gradient_give_zero_gradients(impl: str) -> None:
    device = KERNEL_DEVICE if impl == "triton" else "cpu"
    hidden, weight, labels = make_inputs(13, 48, 1007, torch.float16, device)
    out = linear_logprobs(hidden, weight, labels, with_entropy=True, impl=impl)
    d_hidden, d_weight = torch.autograd.grad((out.logprobs * 0.0).sum() + (out.entropy * 0.0).sum(),
                                             (hidden, weight))
    assert d_hidden.dtype == torch.float16 and d_weight.dtype == torch.float16
    assert torch.count_nonzero(d_hidden) == 0 and torch.count_nonzero(d_weight) == 0


def test_rows_without_gradient_are_never_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Masked or NSR-filtered tokens (zero log-prob and entropy gradient) are dropped before the backward kernels:
    only the 9 rows with a gradient reach them, and the gradients still match the float64 truth with zeros
    elsewhere."""
    from dsrl_fast.kernels import linear_logprobs as kernels
    from dsrl_fast.ops.linear_logprobs import FusedOptions

    launched: list[int] = []
    launch = kernels.dlogits

    def spy(*args, **kwargs):
        launched.append(args[0].shape[0])
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernels, "dlogits", spy)
    hidden, weight, labels = make_inputs(27, 48, 301, torch.float32, KERNEL_DEVICE)
    g_logp = torch.randn(27, dtype=torch.float64)
    g_ent = torch.randn(27, dtype=torch.float64)
    keep = torch.zeros(27, dtype=torch.bool)
    keep[[0, 2, 3, 7, 11, 12, 19, 25, 26]] = True
    g_logp[~keep] = 0.0
    g_ent[~keep] = 0.0
    d_hidden, d_weight = _fused_grads(hidden, weight, labels, g_logp.float().to(KERNEL_DEVICE),
                                      g_ent.float().to(KERNEL_DEVICE), FusedOptions(with_entropy=True))
    assert launched and set(launched) == {9}, launched
    _assert_matches_float64(hidden, weight, labels, g_logp, g_ent, d_hidden, d_weight)
    assert torch.count_nonzero(d_hidden[~keep.to(d_hidden.device)]) == 0


def test_rows_tma_cannot_load_take_the_pointer_path() -> None:
    """fp16 rows of 36 columns (72 bytes, not a multiple of 16): no TMA descriptor, the kernels fall back to pointer
    loads; the values and gradients still match the float64 truth (the other fp16 tests take the TMA path)."""
    from dsrl_fast.kernels.linear_logprobs import tma_ok

    hidden, weight, _ = make_inputs(29, 36, 515, torch.float16, KERNEL_DEVICE)
    aligned, _, _ = make_inputs(29, 48, 515, torch.float16, KERNEL_DEVICE)
    assert not tma_ok(hidden.detach(), weight.detach()) and tma_ok(aligned.detach())
    run_case("triton", torch.float16, (29, 36, 515), temperature=1.0, with_entropy=True, device=KERNEL_DEVICE)
