"""token_policy_loss on peers' tensors: padded (B, T) + mask equals packed (N,) + seq_ids equals the float64 oracle,
rollout importance-sampling weights, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from dsrl_fast import PolicyLossConfig, token_policy_loss
from tests.reference import policy_loss_f64

B, T = 5, 7  # odd shapes; row 3 is fully masked


def padded_batch() -> dict[str, torch.Tensor]:
    """Right-padded responses with mixed-sign row advantages (one zero) and off-policy old log-probs."""
    lengths = torch.tensor([7, 2, 5, 0, 4])
    mask = torch.arange(T)[None] < lengths[:, None]
    logp = (-torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_()
    return {
        "logprobs": logp,
        "advantages": torch.tensor([1.3, -0.7, 0.0, -1.1, 0.4], dtype=torch.float64),
        "mask": mask,
        "old_logprobs": (logp.detach() + 0.4 * torch.randn(B, T, dtype=torch.float64)),
        "ref_logprobs": (logp.detach() + 0.3 * torch.randn(B, T, dtype=torch.float64)),
        "entropy": torch.rand(B, T, dtype=torch.float64) * 2,
    }


def oracle(batch: dict[str, torch.Tensor], cfg: PolicyLossConfig) -> torch.Tensor:
    """The float64 sequence-by-sequence reference on the flattened rows."""
    seq_ids = torch.arange(B).repeat_interleave(T)
    adv = batch["advantages"][:, None].expand(B, T).reshape(-1)
    return policy_loss_f64(batch["logprobs"].reshape(-1), batch["entropy"].reshape(-1), adv,
                           batch["mask"].reshape(-1), batch["old_logprobs"].reshape(-1),
                           batch["ref_logprobs"].reshape(-1), seq_ids, cfg)


CONFIGS = [
    PolicyLossConfig(agg="seq-mean-token-mean"),
    PolicyLossConfig(agg="token-mean", samples="negative", clip_ratio_c=3.0, loss_scale=0.01),
    PolicyLossConfig(agg="seq-mean-token-sum-norm", max_response_len=T, samples="positive", clip_high=0.28),
    PolicyLossConfig(agg="seq-mean-token-sum", kl_coef=0.05, kl_type="k2", entropy_coef=0.01),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.agg}-{c.samples}")
@pytest.mark.parametrize("adv_shape", ["row", "row1", "token"])
def test_padded_matches_packed_and_oracle(cfg: PolicyLossConfig, adv_shape: str) -> None:
    batch = padded_batch()
    adv = {"row": batch["advantages"], "row1": batch["advantages"][:, None],
           "token": batch["advantages"][:, None].expand(B, T).contiguous()}[adv_shape]
    loss, metrics = token_policy_loss(batch["logprobs"], adv, entropy=batch["entropy"], mask=batch["mask"],
                                      old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                                      config=cfg)
    (grad,) = torch.autograd.grad(loss, batch["logprobs"])
    want = oracle(batch, cfg)
    (want_grad,) = torch.autograd.grad(want, batch["logprobs"])
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)

    flat = {k: v.reshape(-1) for k, v in batch.items() if k != "advantages"}
    packed, _ = token_policy_loss(flat["logprobs"], batch["advantages"][:, None].expand(B, T).reshape(-1),
                                  entropy=flat["entropy"], mask=flat["mask"], old_logprobs=flat["old_logprobs"],
                                  ref_logprobs=flat["ref_logprobs"], seq_ids=torch.arange(B).repeat_interleave(T),
                                  config=cfg)
    assert packed.item() == loss.item()
    assert metrics["kept_tokens"].item() > 0


def test_square_padded_input_is_per_row() -> None:
    """A 6x6 padded batch used to be read as 6 tokens; now each row is one sequence (NSR keeps whole rows)."""
    logp = -torch.rand(6, 6, dtype=torch.float64)
    adv = torch.tensor([-1.0, 2.0, -0.5, 0.0, 1.0, -2.0], dtype=torch.float64)
    cfg = PolicyLossConfig(samples="negative")
    loss, metrics = token_policy_loss(logp, adv, config=cfg)
    # on-policy, every ratio is 1: the token-mean loss over the 3 negative rows is -mean(A) over their 18 tokens
    assert metrics["kept_tokens"].item() == 18
    assert loss.item() == pytest.approx(-(adv[adv < 0].sum() * 6 / 18).item(), rel=1e-6)


def weighted_oracle(batch: dict[str, torch.Tensor], w: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """token-mean of w·clipped_pg + kl_coef·k3, float64, token by token."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        for t in range(T):
            if not batch["mask"][b, t]:
                continue
            a = float(batch["advantages"][b])
            ratio = torch.exp(batch["logprobs"][b, t] - batch["old_logprobs"][b, t])
            pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
            d = batch["logprobs"][b, t] - batch["ref_logprobs"][b, t]
            total = total + w[b, t] * pg + kl_coef * (torch.exp(-d) + d - 1)
            count += 1
    return total / count


def test_importance_weights_scale_the_policy_term_only() -> None:
    batch = padded_batch()
    w = torch.rand(B, T, dtype=torch.float64) * 2
    w[~batch["mask"]] = float("nan")  # garbage at padding must not leak
    cfg = PolicyLossConfig(kl_coef=0.1)
    loss, _ = token_policy_loss(batch["logprobs"], batch["advantages"], mask=batch["mask"],
                                old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                                weights=w.float(), config=cfg)
    (grad,) = torch.autograd.grad(loss, batch["logprobs"])
    want = weighted_oracle(batch, w.float().double(), 0.1)
    (want_grad,) = torch.autograd.grad(want, batch["logprobs"])
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(grad).all()


def far_off_policy_batch() -> dict[str, torch.Tensor]:
    """padded_batch with the log-ratio shifted by +25 / -25 on two of every three tokens (0.4 noise on all). The old
    log-probs are fp32-representable, so the fp32 cast inside the loss loses nothing against the float64 oracle.
    Row 1 (A < 0) has a log-ratio near +25 at its first token, row 0 (A > 0) near -25 at its second."""
    batch = padded_batch()
    shift = torch.tensor([25.0, -25.0, 0.0], dtype=torch.float64).repeat(T)[:T].expand(B, T)
    batch["old_logprobs"] = (batch["old_logprobs"] - shift).float().double()
    return batch


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("clamp", [20.0, 5.0, None])
def test_log_ratio_clamp_matches_the_oracle(clamp: float | None, dual_clip: float | None) -> None:
    """Loss and gradient equal the float64 oracle with |log-ratio| beyond the clamp, both advantage signs, dual
    clip on and off; with the clamp and no dual clip, the A < 0 token at log-ratio ~+25 has a zero gradient."""
    batch = far_off_policy_batch()
    cfg = PolicyLossConfig(clip_ratio_c=dual_clip, log_ratio_clamp=clamp)
    loss, _ = token_policy_loss(batch["logprobs"], batch["advantages"], mask=batch["mask"],
                                old_logprobs=batch["old_logprobs"], config=cfg)
    (grad,) = torch.autograd.grad(loss, batch["logprobs"])
    want = oracle(batch, cfg)
    (want_grad,) = torch.autograd.grad(want, batch["logprobs"])
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(grad).all()
    if dual_clip is None:
        assert (grad[1, 0] == 0) == (clamp is not None)


def test_log_ratio_clamp_changes_only_what_it_clamps() -> None:
    """Clamp 20 vs none: equal loss and gradient when every |log-ratio| <= 20; with a +25 log-ratio on an A < 0
    token and no dual clip, the clamped loss has -A·e^20 where the unclamped one has -A·e^(log-ratio)."""
    near = padded_batch()
    far = far_off_policy_batch()
    results = {}
    for name, batch in (("near", near), ("far", far)):
        for clamp in (20.0, None):
            loss, _ = token_policy_loss(batch["logprobs"], batch["advantages"], mask=batch["mask"],
                                        old_logprobs=batch["old_logprobs"],
                                        config=PolicyLossConfig(log_ratio_clamp=clamp))
            results[name, clamp] = (loss, torch.autograd.grad(loss, batch["logprobs"])[0])
    assert (near["logprobs"] - near["old_logprobs"]).abs().max() < 20
    assert torch.equal(results["near", 20.0][0], results["near", None][0])
    assert torch.equal(results["near", 20.0][1], results["near", None][1])
    # row 1 (A = -0.7), token 0, log-ratio 25 ± noise: the only term the clamp changes by more than ~e^-20
    log_ratio = (far["logprobs"][1, 0] - far["old_logprobs"][1, 0]).item()
    assert log_ratio > 20
    gap = 0.7 * (math.exp(log_ratio) - math.exp(20.0)) / int(far["mask"].sum())
    assert results["far", None][0].item() - results["far", 20.0][0].item() == pytest.approx(gap, rel=1e-6)


@pytest.mark.parametrize("on_policy", [True, False])
def test_kl_ratio_weighted_matches_the_oracle(on_policy: bool) -> None:
    """TRL's bias-corrected KL: the KL term times exp(logp - old). On-policy the loss value is unchanged (ratio 1)
    but the gradient is not (the ratio's gradient is logp's)."""
    batch = padded_batch()
    old = None if on_policy else batch["old_logprobs"]
    results = []
    for weighted in (True, False):
        cfg = PolicyLossConfig(kl_coef=0.3, kl_ratio_weighted=weighted)
        loss, _ = token_policy_loss(batch["logprobs"], batch["advantages"], mask=batch["mask"], old_logprobs=old,
                                    ref_logprobs=batch["ref_logprobs"], config=cfg)
        (grad,) = torch.autograd.grad(loss, batch["logprobs"])
        want = oracle({**batch, "old_logprobs": batch["logprobs"].detach() if on_policy else old}, cfg)
        (want_grad,) = torch.autograd.grad(want, batch["logprobs"])
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
        results.append((loss, grad))
    (weighted_loss, weighted_grad), (plain_loss, plain_grad) = results
    if on_policy:
        torch.testing.assert_close(weighted_loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert (weighted_grad - plain_grad).abs().max() > 1e-3


GOOD = {"logprobs": torch.zeros(B, T), "advantages": torch.zeros(B), "mask": torch.ones(B, T, dtype=torch.bool)}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"logprobs": [0.0]}, TypeError, "logprobs must be a torch.Tensor, got list"),
        ({"logprobs": torch.zeros(2, 3, 4)}, ValueError, r"logprobs must be \(N,\) packed or \(B, T\) padded"),
        ({"logprobs": torch.zeros(B, T, dtype=torch.int64)}, TypeError, "logprobs must have dtype in"),
        ({"advantages": torch.zeros(T)}, ValueError, r"advantages must have shape \(5, 7\) or \(5,\) or \(5, 1\)"),
        ({"advantages": torch.tensor([float("nan")] * B)}, ValueError, "advantages must not contain NaN"),
        ({"mask": torch.ones(B, T)}, TypeError, "mask must have dtype in \\(bool\\), got float32"),
        ({"mask": torch.ones(B, T + 1, dtype=torch.bool)}, ValueError, r"mask must have logprobs' shape \(5, 7\)"),
        ({"weights": torch.ones(B * T)}, ValueError, "weights must have 2 dims"),
        ({"old_logprobs": torch.zeros(B, T, dtype=torch.float16)}, TypeError, "old_logprobs must have dtype in"),
        ({"seq_ids": torch.zeros(B, T, dtype=torch.int64)}, ValueError, "seq_ids must be None with padded"),
        ({"config": PolicyLossConfig(kl_coef=0.1)}, ValueError, "kl_coef=0.1 needs ref_logprobs"),
        ({"config": {"clip_low": 0.2}}, TypeError, "config must be a PolicyLossConfig, got dict"),
    ],
)
def test_bad_input(change: dict, error: type, match: str) -> None:
    args = {**GOOD, **change}
    with pytest.raises(error, match=match):
        token_policy_loss(args.pop("logprobs"), args.pop("advantages"), **args)


def test_packed_seq_mean_needs_seq_ids() -> None:
    with pytest.raises(ValueError, match="needs seq_ids"):
        token_policy_loss(torch.zeros(9), torch.zeros(9), config=PolicyLossConfig(agg="seq-mean-token-mean"))
