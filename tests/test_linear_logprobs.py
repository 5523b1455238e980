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
                                                                 num_splits=s)) for s in (1, 2, 4)]
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
