"""fp32 master weights for 16-bit models: the plain updater and the DeepSpeed config.

At the paper's lr 1e-6 a bf16 weight of magnitude ~1e-2 sits between representable values ~6e-5 apart, so AdamW
applied to bf16 parameters directly leaves them (nearly) unchanged: the run is silently frozen. With fp32 masters
each step moves the master by the Adam step, exactly as an fp32 AdamW on the same gradients would.
"""

from __future__ import annotations

import io

import pytest
import torch

from dsrl_fast.train.update import PolicyModule, TorchUpdater, deepspeed_config

LR = 1e-6
STEPS = 5


def _tiny_model(dtype: torch.dtype) -> torch.nn.Module:
    pytest.importorskip("transformers", reason="the policy module wraps a transformers model (the train extra)")
    from dsrl_fast.toy import build_tiny_qwen3

    return build_tiny_qwen3(32, seed=3).to(dtype)


def _grads(params: list[torch.nn.Parameter], step: int) -> list[torch.Tensor]:
    """Fresh random gradients in each parameter's dtype, of realistic scale (1e-3)."""
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=gen) * 1e-3).to(p.dtype) for p in params]


def _updater(model: torch.nn.Module) -> TorchUpdater:
    return TorchUpdater(PolicyModule(model), lr=LR, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, grad_clip=1e3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_masters_take_the_fp32_adam_step_every_step(dtype: torch.dtype) -> None:
    model = _tiny_model(dtype)
    updater = _updater(model)
    params = updater.params
    assert all(m.dtype == torch.float32 and m is not p for p, m in zip(params, updater.masters))
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    ref_opt = torch.optim.AdamW(reference, lr=LR, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    for step in range(STEPS):
        before = [m.detach().clone() for m in updater.masters]
        grads = _grads(params, step)
        for p, ref, g in zip(params, reference, grads):
            # the fp16 updater scales the loss, so its parameters' gradients arrive multiplied by the scale
            p.grad = (g.float() * updater.scale).to(dtype)
            ref.grad = g.float()
        ref_opt.step()
        norm = updater.step(LR)
        assert torch.isfinite(torch.tensor(norm))
        for i, (master, ref, prev, p) in enumerate(zip(updater.masters, reference, before, params)):
            # same fp32 Adam on the same fp32 gradients (the scale is a power of two: unscaling is exact)
            torch.testing.assert_close(master.detach(), ref.detach(), rtol=0, atol=0, msg=f"param {i} step {step}")
            moved = (master.detach() - prev).abs()
            # an Adam step moves every element by about lr (|m̂/√v̂| <= ~1 plus the decay), never by nothing
            assert moved.max() <= 3 * LR and moved.mean() > 0.2 * LR, (i, step, moved.max(), moved.mean())
            assert torch.equal(p.detach(), master.detach().to(dtype)), "the model holds the rounded master"
            assert p.grad is None and master.grad is None


def test_bf16_adamw_without_masters_is_frozen_and_with_masters_is_not() -> None:
    """The failure this guards against, measured on the same gradients: plain AdamW on bf16 parameters."""
    model = _tiny_model(torch.bfloat16)
    frozen = _tiny_model(torch.bfloat16)
    updater = _updater(model)
    plain = torch.optim.AdamW(list(frozen.parameters()), lr=LR, weight_decay=0.01)
    start = [p.detach().float().clone() for p in updater.masters]
    grads = _grads(updater.params, 0)  # a steady gradient: every Adam step moves each element by ~lr
    for _ in range(20):
        for p, q, g in zip(updater.params, frozen.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        updater.step(LR)
        plain.step()
        plain.zero_grad(set_to_none=True)
    master_moved = torch.cat([(m.detach() - s).abs().flatten() for m, s in zip(updater.masters, start)])
    plain_changed = torch.cat([(q.detach().float() != s).flatten() for q, s in zip(frozen.parameters(), start)])
    assert (master_moved > 10 * LR).float().mean() > 0.9, "20 Adam steps at lr 1e-6 move almost every master >1e-5"
    assert plain_changed.float().mean() < 0.2, f"bf16 AdamW changed {plain_changed.float().mean():.1%} of weights"


def test_fp16_overflow_skips_the_step_and_halves_the_scale() -> None:
    model = _tiny_model(torch.float16)
    updater = _updater(model)
    start_scale = updater.scale
    before = [m.detach().clone() for m in updater.masters]
    for p in updater.params:
        p.grad = torch.full_like(p, float("inf"))
    norm = updater.step(LR)
    assert not torch.isfinite(torch.tensor(norm)) and updater.scale == start_scale / 2
    assert all(torch.equal(m.detach(), b) for m, b in zip(updater.masters, before))


def test_state_dict_round_trip_restores_masters_and_optimizer() -> None:
    model = _tiny_model(torch.bfloat16)
    updater = _updater(model)
    for step in range(2):
        for p, g in zip(updater.params, _grads(updater.params, step)):
            p.grad = g
        updater.step(LR)
    buffer = io.BytesIO()  # through bytes, as a checkpoint does: no tensor is shared between the two updaters
    torch.save(updater.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    other = _updater(_tiny_model(torch.bfloat16))
    other.load_state_dict(state)
    for a, b in zip(updater.masters, other.masters):
        assert torch.equal(a.detach(), b.detach())
    for u in (updater, other):
        for p, g in zip(u.params, _grads(u.params, 2)):
            p.grad = g
        u.step(LR)
    for a, b in zip(updater.masters, other.masters):
        assert torch.equal(a.detach(), b.detach()), "the restored updater continues identically"
    with pytest.raises(ValueError, match="state\\['masters'\\] must hold"):
        _updater(_tiny_model(torch.bfloat16)).load_state_dict(dict(state, masters=[]))


@pytest.mark.parametrize(("dtype", "bf16", "fp16"), [(torch.bfloat16, True, False), (torch.float16, False, True),
                                                      (torch.float32, False, False)])
def test_deepspeed_precision_follows_the_model_dtype(dtype: torch.dtype, bf16: bool, fp16: bool) -> None:
    config = deepspeed_config(zero_stage=2, offload_optimizer=False, offload_params=False, dtype=dtype, lr=LR,
                              weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0)
    assert (config["bf16"]["enabled"], config["fp16"]["enabled"]) == (bf16, fp16)
