"""OpenRLHF integration against the real openrlhf 0.11.2 package on CPU.

`openrlhf.models` imports flash_attn at import time (no CPU build exists), so these tests load OpenRLHF's own
`openrlhf/models/loss.py` through a bare `openrlhf.models` package object that skips that __init__. Covered: the
DSRLPolicyLoss loss, gradient and metrics equal OpenRLHF's PolicyLoss (token-mean and seq-mean, dual clip,
clip-higher, local and global normalizers, TIS "clip" and ICEPOP "mask" token-level IS correction, log-ratios beyond
OpenRLHF's ±20 clamp); NSR/PSR; `patch_policy_loss` rebinds the name PPOActor calls; `patch_actor_forward`
(OpenRLHF's real Actor class from openrlhf/models/actor.py, imported with the flash_attn stand-ins of
tests/stand_ins): action log-probs, entropy and parameter gradients equal OpenRLHF's own forward and a float64
reference on a tiny Qwen3, padded and packed, tied and untied head, temperature 0.7; under DeepSpeed ZeRO-3 on CPU
(one process, `slow`: run with -m slow) the head weight, gathered at call time and registered with the Actor, serves
the fused forward and backward. The launcher and the Ray worker hook: tests/integrations/test_integrations_openrlhf_launch.py.
Not covered (GPUs, vLLM engines, flash_attn): a PPO step of OpenRLHF's own trainer, ring attention across ranks,
the Triton kernel (CPU runs impl=torch).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tests.paths import STAND_INS, TESTS_DIR

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


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("call", [{}, {"dp_size": 2, "batch_num_tokens": 61.0}], ids=["local", "global"])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_equals_openrlhf_beyond_its_log_ratio_clamp(openrlhf_loss, dsrl_openrlhf, dual_clip: float | None,
                                                     call: dict, token_level_loss: bool) -> None:
    """Log-ratios shifted by +25 / -25 on two of every three tokens, advantages of both signs: loss and gradient equal
    OpenRLHF's, which clamps the log-ratio to ±20 (zero gradient there). The per-token gradients are the same fp32
    numbers (bitwise with the local normalizer); the loss differs only by fp32 summation order (1e-6 relative, or
    1e-6 of the summed |per-token gradient| where terms cancel). Without the clamp the same inputs give another loss
    (the inputs exercise it)."""
    torch.manual_seed(5)
    rows, cols = 6, 9
    log_probs = (-torch.rand(rows, cols) * 2).requires_grad_()
    shift = torch.tensor([25.0, -25.0, 0.0]).repeat(cols)[:cols]
    old = log_probs.detach() + 0.4 * torch.randn(rows, cols) - shift
    advantages = torch.tensor([0.8, -1.1, 0.5, -0.3, 1.4, -2.0])[:, None].expand(rows, cols).contiguous()
    mask = (torch.arange(cols)[None] < torch.tensor([9, 3, 0, 6, 1, 8])[:, None]).long()
    if not token_level_loss and call:
        call = {"dp_size": 4, "global_batch_size": 13.0}
    results = []
    for cls in (openrlhf_loss.PolicyLoss, dsrl_openrlhf.DSRLPolicyLoss):
        inputs = log_probs.detach().clone().requires_grad_()
        loss, *_ = cls(dual_clip=dual_clip, token_level_loss=token_level_loss)(inputs, old, advantages,
                                                                              action_mask=mask, **call)
        results.append((loss.detach(), torch.autograd.grad(loss, inputs)[0]))
    (want, want_grad), (got, got_grad) = results
    scale = want_grad.abs().sum().item()
    assert torch.equal(got_grad == 0, want_grad == 0)
    assert (want_grad[[1, 3, 5], 0] == 0).all()  # A < 0 at log-ratio ~+25: no gradient (clamp or dual clip)
    if not call:
        assert torch.equal(got_grad, want_grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-6 * want_grad.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale)
    if dual_clip is None:
        unclamped = dsrl_openrlhf.DSRLPolicyLoss(token_level_loss=token_level_loss)
        unclamped.config = dataclasses.replace(unclamped.config, log_ratio_clamp=None)
        other, *_ = unclamped(log_probs.detach(), old, advantages, action_mask=mask, **call)
        assert (other - want).abs() > 1e-3 * want.abs()


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


# ---- fused log-probs in Actor.forward ---------------------------------------------------------------------------
# openrlhf/models/actor.py imports flash_attn.bert_padding and flash_attn.utils.distributed (through
# ring_attn_utils.py). flash_attn has no CPU build, so `openrlhf_actor` puts the stand-ins of tests/stand_ins/flash_attn
# (the four padding helpers actor.py uses, after flash_attn's documented contract: unpad_input returns (values,
# indices, cu_seqlens, max_seqlen, seqused)) on sys.path while importing actor.py (removed again afterwards). Both the
# original and the patched forward use them, and the packed results are checked against an unpacked float64 reference.
FLASH_ATTN_STAND_IN = str(STAND_INS / "flash_attn")
FLASH_ATTN_MODULES = ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed")


def _import_actor_module() -> types.ModuleType:
    """openrlhf.models.actor, with the flash_attn stand-ins when flash_attn is not installed (needs the bare
    openrlhf.models package of the `openrlhf_loss` fixture, or as `_zero3_check` makes it)."""
    pytest.importorskip("einops", reason="the flash_attn stand-in needs einops.rearrange")
    # what actor.py imports besides flash_attn, imported first: transformers probes for flash_attn by its spec
    for name in ("peft", "peft.tuners.lora", "transformers.modeling_utils", "transformers.integrations.deepspeed",
                 "deepspeed"):
        importlib.import_module(name)
    if importlib.util.find_spec("flash_attn") is None:
        sys.path.append(FLASH_ATTN_STAND_IN)
    return importlib.import_module("openrlhf.models.actor")


@pytest.fixture(scope="module")
def openrlhf_actor(openrlhf_loss):
    """openrlhf/models/actor.py imported with the flash_attn stand-ins; its Actor class restored afterwards."""
    names = [*FLASH_ATTN_MODULES, "openrlhf.models.actor", "openrlhf.models.ring_attn_utils", "openrlhf.models.utils"]
    saved = {k: sys.modules.get(k) for k in names}
    module = _import_actor_module()
    forward = module.Actor.forward
    yield module
    module.Actor.forward = forward
    if FLASH_ATTN_STAND_IN in sys.path:
        sys.path.remove(FLASH_ATTN_STAND_IN)
    for name, mod in saved.items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod


def _tiny_qwen3(tied: bool) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(vocab_size=263, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=tied, use_cache=False)
    torch.manual_seed(11)
    model = transformers.Qwen3ForCausalLM(cfg).float()
    with torch.no_grad():  # a peaked head, as in a trained model
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def _actor_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts + right-padded responses, OpenRLHF's layout: sequences/attention (3, 13), action (3, 6)."""
    sequences = torch.randint(1, 263, (3, 13))
    attention = torch.ones(3, 13, dtype=torch.long)
    attention[0, :3] = 0  # prompt padding
    attention[1, -2:] = 0  # response padding
    attention[2, :1] = 0
    attention[2, -4:] = 0
    sequences = sequences * attention
    action = attention[:, -6:].clone()
    action[0, 0] = 0
    return sequences, attention, action


def _reference(model: torch.nn.Module, sequences, attention, action, temperature):
    """float64 action log-probs (B, A) and entropy (B, A) from the full logits of a float64 copy of `model`."""
    position_ids = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)
    logits = model(sequences, attention_mask=attention, position_ids=position_ids).logits[:, :-1] / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    width = action.shape[1]
    logp = logp_all.gather(-1, sequences[:, 1:, None]).squeeze(-1)[:, -width:] * action
    entropy = -(logp_all.exp() * logp_all).sum(-1)[:, -width:]
    return logp, entropy


def _objective(logp, entropy, action) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.3, logp.shape[1], dtype=logp.dtype)
    return (logp * weights).sum() + 0.3 * (entropy * action).sum()


@pytest.mark.parametrize(("packing", "tied"), [(False, True), (False, False), (True, True)])
def test_patched_actor_forward_equals_openrlhf(openrlhf_actor, dsrl_openrlhf, packing: bool, tied: bool) -> None:
    """Action log-probs, entropy and gradients of the fused forward equal OpenRLHF's forward and a float64
    reference: our error is at most 4x OpenRLHF's own fp32 error + 2e-6 (log-probs/entropy), gradients within
    4x its relative error + 1e-6."""
    actor_cls = openrlhf_actor.Actor
    base = _tiny_qwen3(tied)
    sequences, attention, action = _actor_batch()
    temperature = 0.7
    ref_model = copy.deepcopy(base).double()
    ref_logp, ref_entropy = _reference(ref_model, sequences, attention, action, temperature)
    _objective(ref_logp, ref_entropy, action).backward()
    ref_grads = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
    results = {}
    original_forward = actor_cls.forward
    try:
        for name in ("openrlhf", "dsrl"):
            if name == "dsrl":
                dsrl_openrlhf.patch_actor_forward(impl="torch")
            actor = actor_cls(copy.deepcopy(base), temperature=temperature)
            actor.packing_samples = packing  # set by Actor.__init__ only for a checkpoint path
            logp, output = actor(sequences, action, attention_mask=attention, return_output=True,
                                 return_entropy=True)
            entropy = output.entropy[:, -action.shape[1]:]
            _objective(logp, entropy, action).backward()
            grads = torch.cat([p.grad.flatten() for p in actor.model.parameters()])
            results[name] = (logp.detach().double(), entropy.detach().double(), grads.double(), output)
    finally:
        actor_cls.forward = original_forward
    (want_lp, want_ent, want_g, want_out), (got_lp, got_ent, got_g, got_out) = results["openrlhf"], results["dsrl"]
    assert got_out.logits is None and want_out.logits is not None  # no vocabulary logits on our path
    assert got_lp.shape == want_lp.shape == action.shape
    assert (got_lp[action == 0] == 0).all()
    mask = action.bool()
    for got, want, ref in ((got_lp, want_lp, ref_logp), (got_ent, want_ent, ref_entropy)):
        torch_err = (want - ref)[mask].abs().max().item()
        our_err = (got - ref)[mask].abs()
        assert our_err.max().item() <= 4 * torch_err + 2e-6, f"worst at {our_err.argmax().item()}"
    torch_rel = ((want_g - ref_grads).norm() / ref_grads.norm()).item()
    our_rel = ((got_g - ref_grads).norm() / ref_grads.norm()).item()
    assert ref_grads.norm() > 0 and our_rel <= 4 * torch_rel + 1e-6, (our_rel, torch_rel)


def test_patched_actor_forward_all_logprobs_and_logits_path(openrlhf_actor, dsrl_openrlhf) -> None:
    """return_logprobs without an action mask gives every position's log-prob (B, S-1); a call that wants logits
    still runs OpenRLHF's forward; patching twice keeps one wrapper."""
    actor_cls = openrlhf_actor.Actor
    base = _tiny_qwen3(True)
    sequences, attention, _ = _actor_batch()
    original_forward = actor_cls.forward
    try:
        original = actor_cls(copy.deepcopy(base))
        original.packing_samples = False
        want = original(sequences, attention_mask=attention, return_logprobs=True)
        dsrl_openrlhf.patch_actor_forward(impl="torch")
        patched = actor_cls.forward
        dsrl_openrlhf.patch_actor_forward(impl="torch")
        assert actor_cls.forward is patched
        actor = actor_cls(copy.deepcopy(base))
        actor.packing_samples = False
        got = actor(sequences, attention_mask=attention, return_logprobs=True)
        logits_out = actor(sequences, attention_mask=attention, return_output=True)
    finally:
        actor_cls.forward = original_forward
    assert got.shape == (3, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert logits_out.logits.shape == (3, 13, 263)
    with pytest.raises(ValueError, match="impl must be one of"):
        dsrl_openrlhf.patch_actor_forward(impl="cuda")


def _zero3_check() -> None:
    """Body of the ZeRO-3 test, run in its own interpreter (it initializes torch.distributed): the patched Actor on a
    model built under deepspeed.zero.Init (as OpenRLHF loads it with HfDeepSpeedConfig), one forward/backward
    through DeepSpeed's engine; prints the worst log-prob and relative gradient errors against the unpartitioned
    patched forward."""
    import deepspeed
    import deepspeed.ops

    # gloo carries the collectives; marking DeepSpeed's shared-memory op unavailable skips its one-time C++ build
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    package = types.ModuleType("openrlhf.models")
    package.__path__ = [str(Path(openrlhf.__file__).parent / "models")]
    sys.modules["openrlhf.models"] = package
    actor_module = _import_actor_module()
    from dsrl_fast.integrations import openrlhf as dsrl_openrlhf

    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3, "param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    base = _tiny_qwen3(True)
    sequences, attention, action = _actor_batch()
    dsrl_openrlhf.patch_actor_forward(impl="torch")
    results = []
    for zero3 in (False, True):
        if zero3:
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = _tiny_qwen3(True)
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                model.load_state_dict(base.state_dict())
        else:
            model = copy.deepcopy(base)
        actor = actor_module.Actor(model, temperature=0.7)
        actor.packing_samples = False
        runner = deepspeed.initialize(model=actor, config=config, model_parameters=list(actor.parameters()))[0] \
            if zero3 else actor
        logp, output = runner(sequences, action, attention_mask=attention, return_output=True, return_entropy=True)
        loss = _objective(logp, output.entropy[:, -action.shape[1]:], action)
        if zero3:
            runner.backward(loss)
            grads = [deepspeed.utils.safe_get_full_grad(p) for p in runner.module.parameters()]
        else:
            loss.backward()
            grads = [p.grad for p in actor.parameters()]
        results.append((logp.detach(), torch.cat([g.flatten() for g in grads])))
    (want_lp, want_g), (got_lp, got_g) = results
    print("registered", bool(getattr(actor, "_external_params", None)))
    print("logprob_err", (got_lp - want_lp).abs().max().item())
    print("grad_rel_err", ((got_g - want_g).norm() / want_g.norm()).item())


@pytest.mark.slow
def test_patched_actor_forward_under_zero3() -> None:
    """ZeRO-3 on CPU (one process, gloo): the head weight, registered with the Actor by the fused forward, is gathered
    for the fused forward and backward; log-probs equal the unpartitioned forward to 1e-6, gradients to 1e-5
    relative. 20-50 s here (a fresh interpreter importing DeepSpeed and building its engine on CPU), hence `slow`."""
    pytest.importorskip("deepspeed", reason="needs deepspeed")
    code = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r})\n"
            "import test_integrations_openrlhf as t; t._zero3_check()")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29541", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    values = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ")[0] in (
        "registered", "logprob_err", "grad_rel_err"))
    assert values["registered"] == "True", out.stdout[-2000:]
    assert float(values["logprob_err"]) <= 1e-6 and float(values["grad_rel_err"]) <= 1e-5, values


def test_setup_worker_patches_loss_and_forward(openrlhf_actor, openrlhf_loss, dsrl_openrlhf,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray worker hook reads its options from the environment and patches PolicyLoss and Actor.forward."""
    actor_cls = openrlhf_actor.Actor
    monkeypatch.setattr(actor_cls, "forward", actor_cls.forward)
    monkeypatch.setattr(openrlhf_loss, "PolicyLoss", openrlhf_loss.PolicyLoss)
    monkeypatch.setattr(sys.modules["openrlhf.models"], "PolicyLoss", openrlhf_loss.PolicyLoss, raising=False)
    monkeypatch.setenv("DSRL_FAST_SAMPLES", "negative")
    monkeypatch.setenv("DSRL_FAST_FUSED_LOGPROBS", "yes")
    with pytest.raises(ValueError, match="DSRL_FAST_FUSED_LOGPROBS must be '0' or '1'"):
        dsrl_openrlhf.setup_worker()
    monkeypatch.setenv("DSRL_FAST_FUSED_LOGPROBS", "1")
    dsrl_openrlhf.setup_worker()
    assert getattr(actor_cls.forward, "_dsrl_fast", False)
    assert sys.modules["openrlhf.models"].PolicyLoss().config.samples == "negative"
