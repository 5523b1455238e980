"""fp32 master weights and fp32 gradient accumulation for 16-bit models: the plain updater and the DeepSpeed config.

At the paper's lr 1e-6 a bf16 weight of magnitude ~1e-2 sits between representable values ~6e-5 apart, so AdamW
applied to bf16 parameters directly leaves them (nearly) unchanged: the run is silently frozen. With fp32 masters
each step moves the master by the Adam step, exactly as an fp32 AdamW on the same gradients would.

A paper-sized step is hundreds of micro-batches: summed in bf16 the gradient drifts several bf16 roundings from
the exact sum of the micro-batches' gradients (64 micro-batches: ~5.8 roundings), summed in fp32 it stays within
one.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from dsrl_fast.train.updaters import PolicyModule, TorchUpdater, deepspeed_config
from tests.paths import REPO_ROOT

LR = 1e-6
STEPS = 5


def _tiny_model(dtype: torch.dtype) -> torch.nn.Module:
    pytest.importorskip("transformers", reason="the policy module wraps a transformers model (the train extra)")
    from dsrl_fast.model.tiny import build_tiny_qwen3

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


# --- gradient accumulation over many micro-batches ----------------------------------------------------------------

MICRO_BATCHES = 64


def _exact_sum(module: PolicyModule, batches: list, params: list[torch.nn.Parameter], scale: float = 1.0
               ) -> list[torch.Tensor]:
    """The float64 sum of each micro-batch's own 16-bit gradient (of the loss times `scale`), one per parameter."""
    from dsrl_fast.loss.config import PolicyLossConfig

    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for batch, advantages in batches:
        grads = torch.autograd.grad(module(batch, advantages, PolicyLossConfig()).loss * scale, params,
                                    allow_unused=True)
        for t, g in zip(total, grads, strict=True):
            if g is not None:
                t += g.double()
    return total


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.stack([t.double().square().sum() for t in tensors]).sum().sqrt())


def _rounding(exact: list[torch.Tensor], dtype: torch.dtype) -> float:
    """The norm of one rounding of the exact final gradient to `dtype`: the error budget."""
    return _norm([e.to(dtype).double() - e for e in exact])


def test_plain_updater_accumulates_64_bf16_micro_batches_in_fp32(one_torch_thread: None) -> None:
    """The master's fp32 gradient after 64 bf16 micro-batches through forward_backward is within one bf16 rounding
    of the exact sum of their gradients (measured ~1e-6 of it); the bf16 .grad that autograd accumulates on the same
    model (what the updater stepped on before) is several roundings away (measured ~5.8)."""
    from dsrl_fast.loss.config import PolicyLossConfig
    from tests.precision_worker import micro_batches, tiny_16bit_model

    model = tiny_16bit_model(torch.bfloat16)
    plain = PolicyModule(copy.deepcopy(model), impl="torch")
    updater = TorchUpdater(PolicyModule(model, impl="torch"), lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                           grad_clip=0.0)
    batches = micro_batches(MICRO_BATCHES, seed=1)
    exact = _exact_sum(updater.module, batches, updater.params)
    for i, (batch, advantages) in enumerate(batches):
        updater.forward_backward(batch, advantages, PolicyLossConfig(), last=i == MICRO_BATCHES - 1)
        plain(batch, advantages, PolicyLossConfig()).loss.backward()
    assert all(p.grad is None for p in updater.params), "each 16-bit gradient is freed once it is in the master"
    budget = _rounding(exact, torch.bfloat16)
    ours = _norm([m.grad.double() - e for m, e in zip(updater.masters, exact, strict=True)])
    bf16_sum = _norm([(p.grad.double() if p.grad is not None else 0) - e
                      for p, e in zip(plain.parameters(), exact, strict=True)])
    print(f"\n{MICRO_BATCHES} bf16 micro-batches: fp32 accumulation error {ours / budget:.1e}, bf16 accumulation "
          f"{bf16_sum / budget:.2f} bf16 roundings of the final gradient")
    assert ours <= budget, (ours, budget)
    assert bf16_sum > 2 * budget, (bf16_sum, budget)
    norm = updater.step(LR)
    assert norm == pytest.approx(_norm(exact), rel=1e-6)


def test_fp16_loss_scaling_with_fp32_accumulation(one_torch_thread: None) -> None:
    """fp16: the fp32 sum of the scaled micro-batch gradients is within one fp16 rounding of the exact sum, the step
    unscales it (its pre-clip norm is the exact sum's over the scale) and the masters move."""
    from dsrl_fast.loss.config import PolicyLossConfig
    from tests.precision_worker import micro_batches, tiny_16bit_model

    updater = TorchUpdater(PolicyModule(tiny_16bit_model(torch.float16), impl="torch"), lr=LR, weight_decay=0.0,
                           betas=(0.9, 0.999), eps=1e-8, grad_clip=0.0)
    assert updater.scale == TorchUpdater.FP16_INITIAL_SCALE
    batches = micro_batches(MICRO_BATCHES, seed=2)
    exact = _exact_sum(updater.module, batches, updater.params, scale=updater.scale)
    for i, (batch, advantages) in enumerate(batches):
        updater.forward_backward(batch, advantages, PolicyLossConfig(), last=i == MICRO_BATCHES - 1)
    ours = _norm([m.grad.double() - e for m, e in zip(updater.masters, exact, strict=True)])
    assert ours <= _rounding(exact, torch.float16), (ours, _rounding(exact, torch.float16))
    before = [m.detach().clone() for m in updater.masters]
    norm = updater.step(LR)
    assert norm == pytest.approx(_norm(exact) / TorchUpdater.FP16_INITIAL_SCALE, rel=1e-6)
    assert updater.scale == TorchUpdater.FP16_INITIAL_SCALE, "no overflow, no skipped step"
    assert all(not torch.equal(m.detach(), b) for m, b in zip(updater.masters, before))


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float | str]]:
    """tests/precision_worker.py in a subprocess (a one-rank process group must not outlive it): ZeRO-1, 2, 3 with
    the trainer's config, and ZeRO-2 with DeepSpeed's default accumulation dtype."""
    pytest.importorskip("deepspeed", reason="the DeepSpeed updater needs deepspeed (the train extra)")
    out = tmp_path_factory.mktemp("precision") / "runs.json"
    root = REPO_ROOT
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, str(root / "tests" / "precision_worker.py"), "--runs", "1,2,3,2-default",
               "--micro-batches", str(MICRO_BATCHES), "--out", str(out)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("run", ["2", "3"])
def test_deepspeed_zero_accumulates_bf16_micro_batches_in_fp32(deepspeed_runs: dict, run: str) -> None:
    """ZeRO-2/3 with data_types.grad_accum_dtype=fp32 (deepspeed_config): DeepSpeed's accumulated gradient
    (safe_get_full_grad, at the boundary) is within one bf16 rounding of the exact sum of 64 micro-batches'."""
    result = deepspeed_runs[run]
    assert result["accumulation"] == "torch.float32"
    assert result["error"] <= result["one_bf16_rounding"], result


def test_deepspeed_zero1_rounds_the_fp32_sum_once(deepspeed_runs: dict) -> None:
    """ZeRO-1 with a bf16 model runs DeepSpeed's BF16_Optimizer, which accumulates in fp32 and rounds the sum once
    to bf16 for its all-reduce at the boundary (communication_data_type follows the model dtype): the error is
    that one rounding (equal to it up to the fp32 sum's own ~1e-6 relative error)."""
    result = deepspeed_runs["1"]
    assert (result["optimizer"], result["accumulation"]) == ("BF16_Optimizer", "torch.float32")
    assert result["error"] <= 1.001 * result["one_bf16_rounding"], result


def test_deepspeed_default_accumulation_is_bf16_and_fails_the_budget(deepspeed_runs: dict) -> None:
    """Without the data_types section DeepSpeed sums a bf16 model's micro-batch gradients in bf16: several
    roundings off (what deepspeed_config now overrides)."""
    result = deepspeed_runs["2-default"]
    assert result["accumulation"] == "torch.bfloat16"
    assert result["error"] > 2 * result["one_bf16_rounding"], result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_deepspeed_stage_0_is_refused_for_16_bit_models(dtype: torch.dtype) -> None:
    """DeepSpeed 0.19.8 refuses fp32 accumulation without ZeRO (NotImplementedError at initialize): one line
    naming the key, before any engine starts."""
    with pytest.raises(ValueError, match="^deepspeed.zero_stage must be >= 1 for a .*16 model .*, got 0$"):
        deepspeed_config(zero_stage=0, offload_optimizer=False, offload_params=False, dtype=dtype, lr=LR,
                         weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0)
    config = deepspeed_config(zero_stage=0, offload_optimizer=False, offload_params=False, dtype=torch.float32,
                              lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0)
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
