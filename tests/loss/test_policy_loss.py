"""policy_loss against the float64 sequence-by-sequence oracle, plus the liger-kernel peer and a short training run."""

from __future__ import annotations


import pytest
import torch

from dsrl_fast import PolicyLossConfig, policy_loss
from tests.conftest import KERNEL_DEVICE
from tests.reference import logprobs_entropy_f64, policy_loss_f64

H, V = 48, 1000 + 7
SEQ_LENS = [5, 1, 9, 7, 3, 12]


def make_batch(dtype: torch.dtype = torch.float32, device: str = "cpu", off_policy: bool = True):
    """Six sequences with mixed-sign advantages (one zero), a random mask, old log-probs that trigger clipping."""
    n = sum(SEQ_LENS)
    hidden = torch.randn(n, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * (3.0 / H**0.5)
    labels = torch.randint(0, V, (n,))
    seq_ids = torch.repeat_interleave(torch.arange(len(SEQ_LENS)), torch.tensor(SEQ_LENS))
    seq_adv = torch.tensor([1.3, -0.7, 0.0, -1.1, 0.4, -0.2])
    advantages = seq_adv[seq_ids].float()
    mask = torch.rand(n) > 0.2
    true_logp, _ = logprobs_entropy_f64(hidden, weight, labels, 1.0)
    old = (true_logp + 0.4 * torch.randn(n, dtype=torch.float64)).float() if off_policy else None
    ref = (true_logp + 0.3 * torch.randn(n, dtype=torch.float64)).float()
    to = dict(device=device)
    return dict(
        hidden=hidden.to(dtype=dtype, **to).requires_grad_(), weight=weight.to(dtype=dtype, **to).requires_grad_(),
        labels=labels.to(**to), advantages=advantages.to(**to), mask=mask.to(**to),
        old_logprobs=None if old is None else old.to(**to), ref_logprobs=ref.to(**to), seq_ids=seq_ids.to(**to),
    )


# The gradient-in-forward path runs with a 16-row chunk here, so chunks cross sequences and the 37-token batch.
GIF_WORKSPACE = 16 * V * 4


def check_against_oracle(cfg: PolicyLossConfig, impl: str, batch: dict, atol: float = 2e-5) -> None:
    extra = {"workspace_bytes": GIF_WORKSPACE} if impl == "grad_in_forward" else {}
    out = policy_loss(batch["hidden"], batch["weight"], batch["labels"], batch["advantages"], mask=batch["mask"],
                      old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                      seq_ids=batch["seq_ids"], config=cfg, impl=impl, **extra)
    d_hidden, d_weight = torch.autograd.grad(out.loss, (batch["hidden"], batch["weight"]), allow_unused=False)

    h64 = batch["hidden"].detach().cpu().double().requires_grad_()
    w64 = batch["weight"].detach().cpu().double().requires_grad_()
    logp, ent = logprobs_entropy_f64(h64, w64, batch["labels"].cpu(), cfg.temperature)
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    want = policy_loss_f64(logp, ent, cpu["advantages"], cpu["mask"], cpu["old_logprobs"], cpu["ref_logprobs"],
                           cpu["seq_ids"], cfg)
    if want.requires_grad:
        t_dh, t_dw = torch.autograd.grad(want, (h64, w64), allow_unused=True)
    else:
        t_dh, t_dw = torch.zeros_like(h64), torch.zeros_like(w64)
    t_dh = torch.zeros_like(h64) if t_dh is None else t_dh
    t_dw = torch.zeros_like(w64) if t_dw is None else t_dw

    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    torch.testing.assert_close(out.loss.detach().cpu().double(), want.detach(), rtol=1e-5, atol=atol)
    scale = max(t_dh.abs().max().item(), t_dw.abs().max().item(), 1e-6)
    torch.testing.assert_close(d_hidden.cpu().double() / scale, t_dh / scale, rtol=0, atol=atol)
    torch.testing.assert_close(d_weight.cpu().double() / scale, t_dw / scale, rtol=0, atol=atol)


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("samples", ["all", "negative", "positive"])
def test_samples_and_aggregation_torch(samples: str, agg: str) -> None:
    cfg = PolicyLossConfig(samples=samples, agg=agg, max_response_len=16, loss_scale=0.5)
    check_against_oracle(cfg, "torch", make_batch())


@pytest.mark.parametrize(("samples", "agg"), [("all", "token-mean"), ("negative", "token-mean"),
                                              ("positive", "seq-mean-token-mean"), ("all", "seq-mean-token-sum-norm")])
@pytest.mark.parametrize("impl", ["triton", "grad_in_forward"])
def test_samples_and_aggregation_triton(impl: str, samples: str, agg: str) -> None:
    cfg = PolicyLossConfig(samples=samples, agg=agg, max_response_len=16, loss_scale=0.5)
    check_against_oracle(cfg, impl, make_batch(device=KERNEL_DEVICE))


@pytest.mark.parametrize("impl", ["torch", "triton", "grad_in_forward"])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_penalty(impl: str, kl_type: str) -> None:
    device = "cpu" if impl == "torch" else KERNEL_DEVICE
    check_against_oracle(PolicyLossConfig(kl_coef=0.1, kl_type=kl_type), impl, make_batch(device=device))


@pytest.mark.parametrize("impl", ["torch", "triton", "grad_in_forward"])
def test_dual_clip_entropy_temperature_clip_higher(impl: str) -> None:
    device = "cpu" if impl == "torch" else KERNEL_DEVICE
    cfg = PolicyLossConfig(clip_ratio_c=1.5, clip_high=0.28, entropy_coef=0.01, temperature=0.8, samples="all")
    check_against_oracle(cfg, impl, make_batch(device=device))


@pytest.mark.parametrize("impl", ["torch", "triton", "grad_in_forward"])
def test_fp16_inputs(impl: str) -> None:
    device = "cpu" if impl == "torch" else KERNEL_DEVICE
    # fp16 inputs are exact in the oracle (it upcasts them); the budget covers fp16 rounding of dz in the GEMMs.
    check_against_oracle(PolicyLossConfig(), impl, make_batch(dtype=torch.float16, device=device), atol=2e-3)


def test_on_policy_ratio_is_one_and_norm_tokens() -> None:
    batch = make_batch(off_policy=False)
    cfg = PolicyLossConfig(norm_tokens=100)
    check_against_oracle(cfg, "torch", batch)
    out = policy_loss(batch["hidden"], batch["weight"], batch["labels"], batch["advantages"], mask=batch["mask"],
                      config=cfg, impl="torch")
    assert out.metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert out.metrics["clip_frac"].item() == 0.0


@pytest.mark.parametrize("impl", ["torch", "triton", "grad_in_forward"])
def test_metrics(impl: str) -> None:
    device = "cpu" if impl == "torch" else KERNEL_DEVICE
    batch = make_batch(device=device)
    out = policy_loss(batch["hidden"], batch["weight"], batch["labels"], batch["advantages"], mask=batch["mask"],
                      old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                      seq_ids=batch["seq_ids"], config=PolicyLossConfig(kl_coef=0.05), impl=impl)
    kept = batch["mask"].cpu()
    logp = out.logprobs.detach().cpu()
    ratio = torch.exp(logp - batch["old_logprobs"].cpu())[kept]
    adv = batch["advantages"].cpu()[kept]
    clipped = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert out.metrics["kept_tokens"].item() == kept.sum().item()
    assert out.metrics["ratio_mean"].item() == pytest.approx(ratio.mean().item(), rel=1e-5)
    assert out.metrics["clip_frac"].item() == pytest.approx(clipped.float().mean().item(), abs=1e-6)
    d = logp[kept] - batch["ref_logprobs"].cpu()[kept]
    assert out.metrics["kl_mean"].item() == pytest.approx((torch.exp(-d) + d - 1).mean().item(), rel=1e-4)
    assert out.metrics["entropy_mean"].item() == pytest.approx(out.entropy.detach().cpu()[kept].mean().item(),
                                                               rel=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton", "grad_in_forward"])
@pytest.mark.parametrize("case", ["all-masked", "no-negative", "zero-tokens"])
def test_empty_selection_gives_zero_loss_and_gradient(impl: str, case: str) -> None:
    device = "cpu" if impl == "torch" else KERNEL_DEVICE
    batch = make_batch(device=device)
    cfg = PolicyLossConfig(samples="negative" if case == "no-negative" else "all", agg="seq-mean-token-mean")
    if case == "all-masked":
        batch["mask"] = torch.zeros_like(batch["mask"])
    if case == "no-negative":
        batch["advantages"] = batch["advantages"].abs()
    if case == "zero-tokens":
        for key in ("hidden", "labels", "advantages", "mask", "old_logprobs", "ref_logprobs", "seq_ids"):
            batch[key] = batch[key][:0].detach().requires_grad_(key == "hidden")
    out = policy_loss(batch["hidden"], batch["weight"], batch["labels"], batch["advantages"], mask=batch["mask"],
                      old_logprobs=batch["old_logprobs"], seq_ids=batch["seq_ids"], config=cfg, impl=impl)
    assert out.loss.item() == 0.0
    out.loss.backward()
    for name in ("hidden", "weight"):
        grad = batch[name].grad
        assert grad is not None and torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0, name


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"advantages": torch.tensor([float("nan")] * 37)}, "advantages must not contain NaN"),
        ({"advantages": torch.zeros(36)}, r"advantages must have shape \(37,\)"),
        ({"mask": torch.ones(37, dtype=torch.int64)}, "mask must have dtype in"),
        ({"seq_ids": None, "config": PolicyLossConfig(agg="seq-mean-token-mean")}, "needs seq_ids"),
        ({"ref_logprobs": None, "config": PolicyLossConfig(kl_coef=0.1)}, "needs ref_logprobs"),
        ({"config": {"clip_low": 0.2}}, "config must be a PolicyLossConfig, got dict"),
        ({"old_logprobs": torch.zeros(37, dtype=torch.float16)}, "old_logprobs must have dtype in"),
    ],
)
def test_bad_loss_input(change: dict, match: str) -> None:
    batch = make_batch()
    args = {k: batch[k] for k in ("mask", "old_logprobs", "ref_logprobs", "seq_ids")}
    args["config"] = PolicyLossConfig()
    advantages = change.pop("advantages", batch["advantages"])
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        policy_loss(batch["hidden"], batch["weight"], batch["labels"], advantages, impl="torch", **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_low": 1.0}, "clip_low must be < 1"),
        ({"clip_ratio_c": 1.0}, "clip_ratio_c must be > 1"),
        ({"samples": "neg"}, r"samples must be one of \('all', 'negative', 'positive'\), got 'neg'"),
        ({"agg": "mean"}, "agg must be one of"),
        ({"kl_type": "k4"}, "kl_type must be one of"),
        ({"agg": "seq-mean-token-sum-norm"}, "needs max_response_len"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"norm_tokens": 0}, "norm_tokens must be a positive int"),
        ({"norm_tokens": 5, "agg": "seq-mean-token-mean"}, "norm_tokens applies to agg='token-mean' only"),
        ({"log_ratio_clamp": 0.0}, "log_ratio_clamp must be > 0, got 0.0"),
        ({"log_ratio_clamp": float("inf")}, "log_ratio_clamp must be a finite number, got inf"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kwargs)
    with pytest.raises(TypeError, match="kl_ratio_weighted must be a bool, got str"):
        PolicyLossConfig(kl_ratio_weighted="yes")


@pytest.mark.parametrize("impl", ["torch", "triton", "grad_in_forward"])
def test_log_ratio_clamp_and_weighted_kl_on_every_path(impl: str) -> None:
    """Old log-probs 25 nats off on a third of the tokens (both signs), no dual clip, clamp 20, bias-corrected KL:
    the fused paths equal the float64 oracle, which clamps the same way."""
    batch = make_batch(device="cpu" if impl == "torch" else KERNEL_DEVICE)
    shift = torch.tensor([25.0, -25.0, 0.0]).repeat(len(batch["labels"]))[:len(batch["labels"])]
    batch["old_logprobs"] = batch["old_logprobs"] - shift.to(batch["old_logprobs"].device)
    cfg = PolicyLossConfig(log_ratio_clamp=20.0, kl_coef=0.1, kl_ratio_weighted=True)
    check_against_oracle(cfg, impl, batch)


@pytest.mark.parametrize(("loss_type", "agg"), [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                                ("dr_grpo", "seq-mean-token-sum-norm")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_liger_grpo_loss(loss_type: str, agg: str, beta: float) -> None:
    """On configurations liger-kernel's LigerFusedLinearGRPOLoss supports, loss and gradients agree."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is an optional peer")
    b, t = 4, 9
    hidden = torch.randn(b, t, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * (3.0 / H**0.5)
    ids = torch.randint(0, V, (b, t))
    attn = torch.ones(b, t, dtype=torch.int64)
    attn[1, 5:] = 0
    attn[3, 2:] = 0
    adv = torch.tensor([0.8, -1.2, 0.3, -0.5])
    logp64, _ = logprobs_entropy_f64(hidden.reshape(-1, H), weight, ids.reshape(-1), 1.0)
    old = (logp64 + 0.3 * torch.randn_like(logp64)).float().reshape(b, t)
    ref = (logp64 + 0.2 * torch.randn_like(logp64)).float().reshape(b, t)

    peer = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta != 0, chunk_size=2,
                                            loss_type=loss_type, max_completion_length=t)
    hp, wp = hidden.float().requires_grad_(), weight.float().requires_grad_()
    peer_out = peer(hp, wp, ids, attn, adv, ref_per_token_logps=ref if beta else None, old_per_token_logps=old)
    peer_loss = peer_out[0] if isinstance(peer_out, tuple) else peer_out
    peer_loss.backward()

    ho, wo = hidden.float().reshape(-1, H).requires_grad_(), weight.float().requires_grad_()
    cfg = PolicyLossConfig(agg=agg, max_response_len=t, kl_coef=beta, kl_type="k3")
    out = policy_loss(ho, wo, ids.reshape(-1), adv.repeat_interleave(t), mask=attn.reshape(-1).bool(),
                      old_logprobs=old.reshape(-1), ref_logprobs=ref.reshape(-1),
                      seq_ids=torch.arange(b).repeat_interleave(t), config=cfg, impl="torch")
    out.loss.backward()
    torch.testing.assert_close(out.loss, peer_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ho.grad.reshape(b, t, H), hp.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wo.grad, wp.grad, rtol=1e-4, atol=1e-6)


def test_training_steps_match_reference() -> None:
    """A few AdamW steps of a tiny linear-head model: fused (Triton) and float64-oracle losses stay together.

    old_logprobs come from the initial weights, so the ratio (and the loss value) moves as the model trains.
    """
    torch.manual_seed(1)
    n, h, v = 40, 32, 211
    features = torch.randn(n, h, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    seq_ids = torch.arange(n) // 8
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2])[seq_ids]
    cfg = PolicyLossConfig(samples="all", clip_ratio_c=3.0)
    init = torch.randn(v, h, dtype=torch.float64) * 0.2
    old, _ = logprobs_entropy_f64(features, init, labels, 1.0)

    def train(fused: bool) -> list[float]:
        dtype, device = (torch.float32, KERNEL_DEVICE) if fused else (torch.float64, "cpu")
        weight = torch.nn.Parameter(init.to(device, dtype))
        proj = torch.nn.Parameter(torch.eye(h, dtype=dtype, device=device))
        opt = torch.optim.AdamW([weight, proj], lr=2e-3)
        losses = []
        for _ in range(6):
            hidden = features.to(device, dtype) @ proj
            if fused:
                loss = policy_loss(hidden, weight, labels.to(device), advantages.to(device),
                                   old_logprobs=old.float().to(device), seq_ids=seq_ids.to(device), config=cfg,
                                   impl="triton").loss
            else:
                logp, ent = logprobs_entropy_f64(hidden, weight, labels, 1.0)
                loss = policy_loss_f64(logp, ent, advantages, torch.ones(n, dtype=torch.bool), old, None, seq_ids,
                                       cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    fused, oracle = train(True), train(False)
    assert len(set(round(x, 6) for x in oracle)) > 3, f"the loss should move while training, got {oracle}"
    assert fused == pytest.approx(oracle, abs=2e-5)
