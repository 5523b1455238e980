"""OpenRLHF integration against the real openrlhf 0.11.2 package on CPU.

`openrlhf.models` imports flash_attn at import time (no CPU build exists), so these tests load OpenRLHF's own
`openrlhf/models/loss.py` through a bare `openrlhf.models` package object that skips that __init__. Covered: the
DSRLPolicyLoss loss, gradient and metrics equal OpenRLHF's PolicyLoss (token-mean and seq-mean, dual clip,
clip-higher, local and global normalizers, TIS "clip" and ICEPOP "mask" token-level IS correction); NSR/PSR;
`patch_policy_loss` rebinds the name PPOActor calls. Not covered (Ray actors, DeepSpeed on GPUs, vLLM engines):
a PPO step of OpenRLHF's own trainer, and `setup_worker` running inside a Ray worker.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

openrlhf = pytest.importorskip("openrlhf", reason="needs openrlhf (pip install --no-deps openrlhf==0.11.2)")


@pytest.fixture(scope="module")
def openrlhf_loss():
    """OpenRLHF's loss module, imported without running openrlhf/models/__init__.py (it needs flash_attn)."""
    saved = {k: sys.modules.get(k) for k in ("openrlhf.models", "openrlhf.models.loss", "openrlhf.models.utils")}
    package = types.ModuleType("openrlhf.models")
    package.__path__ = [str(Path(openrlhf.__file__).parent / "models")]
    sys.modules["openrlhf.models"] = package
    module = importlib.import_module("openrlhf.models.loss")
    yield module
    for name, mod in saved.items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod


@pytest.fixture(scope="module")
def dsrl_openrlhf(openrlhf_loss):
    from dsrl_fast.integrations import openrlhf as module

    return module


B, T = 5, 8


def batch() -> dict[str, torch.Tensor]:
    lengths = torch.tensor([8, 3, 0, 6, 1])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    log_probs = (-torch.rand(B, T, dtype=torch.float64) * 2).float().requires_grad_()
    old = log_probs.detach() + 0.4 * torch.randn(B, T)
    return {"log_probs": log_probs, "old_log_probs": old,
                "advantages": torch.tensor([0.9, -1.2, 0.3, -0.4, 0.0])[:, None].expand(B, T).contiguous(),
                "action_mask": mask, "rollout_log_probs": old + 0.3 * torch.randn(B, T)}


CASES = {
    "token": {"kwargs": {"clip_eps_low": 0.2, "clip_eps_high": 0.28}, "call": {}},
    "seq-dual": {"kwargs": {"dual_clip": 3.0, "token_level_loss": False}, "call": {}},
    "token-global": {"kwargs": {"dual_clip": 2.0}, "call": {"dp_size": 2, "batch_num_tokens": 30.0}},
    "seq-global": {"kwargs": {"token_level_loss": False}, "call": {"dp_size": 4, "global_batch_size": 13.0}},
    "tis-clip": {"kwargs": {"is_correction_level": "token", "is_correction_mode": "clip",
                                 "is_correction_threshold": [0.8, 1.2]}, "call": {}},
    "icepop-mask": {"kwargs": {"is_correction_level": "token", "is_correction_mode": "mask",
                                    "is_correction_threshold": [0.8, 1.25]}, "call": {}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_openrlhf_policy_loss(openrlhf_loss, dsrl_openrlhf, case: str) -> None:
    spec = CASES[case]
    results = []
    shared = batch()
    for cls in (openrlhf_loss.PolicyLoss, dsrl_openrlhf.DSRLPolicyLoss):
        inputs = {**shared, "log_probs": shared["log_probs"].detach().clone().requires_grad_()}
        loss, clip_ratio, ppo_kl, vllm_kl, filtered = cls(**spec["kwargs"])(**inputs, **spec["call"])
        (grad,) = torch.autograd.grad(loss, inputs["log_probs"])
        results.append((loss.detach(), grad, clip_ratio, ppo_kl, vllm_kl, filtered))
    want, got = results
    assert want[0].abs() > 1e-3
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    for g, w in zip(got[2:], want[2:]):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-6)


def test_nsr_keeps_negative_rows_only(openrlhf_loss, dsrl_openrlhf) -> None:
    inputs = batch()
    got, *_ = dsrl_openrlhf.DSRLPolicyLoss(samples="negative", denominator="kept")(**inputs)
    rows = (inputs["advantages"][:, 0] < 0) & (inputs["action_mask"].sum(-1) > 0)
    sub = {k: v[rows] for k, v in inputs.items()}
    want, *_ = openrlhf_loss.PolicyLoss()(**sub)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_patch_rebinds_the_name_ppo_actor_calls(openrlhf_loss, dsrl_openrlhf) -> None:
    original = openrlhf_loss.PolicyLoss
    try:
        factory = dsrl_openrlhf.patch_policy_loss(samples="negative", loss_scale=0.01)
        assert sys.modules["openrlhf.models"].PolicyLoss is factory
        # the arguments PPOActor passes (openrlhf/trainer/ray/ppo_actor.py)
        built = sys.modules["openrlhf.models"].PolicyLoss(
            clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=None, token_level_loss=True, policy_loss_type="ppo",
            is_correction_level="off", is_correction_mode="mask", is_correction_gating="ratio",
            is_correction_threshold=[0.5, 5.0])
        assert isinstance(built, dsrl_openrlhf.DSRLPolicyLoss)
        assert built.config.samples == "negative" and built.config.loss_scale == 0.01
    finally:
        openrlhf_loss.PolicyLoss = original


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"policy_loss_type": "gspo"}, "policy_loss_type must be 'ppo'"),
    ({"is_correction_level": "seq"}, "is_correction_level must be 'off' or 'token'"),
    ({"is_correction_level": "token", "is_correction_gating": "tv"}, "is_correction_gating must be 'ratio'"),
    ({"samples": "neg"}, "samples must be one of"),
])
def test_rejects_unsupported_options(dsrl_openrlhf, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dsrl_openrlhf.DSRLPolicyLoss(**kwargs)
