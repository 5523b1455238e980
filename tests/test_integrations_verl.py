"""verl integration against the real verl 0.9.1 package on CPU.

Covered here: the registered "dsrl" loss and its gradient equal verl's own "vanilla" loss (dual clip, clip-higher,
rollout IS weights) for every loss_agg_mode, with and without verl's global batch normalizers (GRPO / DAPO-style
token-mean / Dr.GRPO's seq-mean-token-sum-norm); "nsr"/"psr" drop the other sequences from numerator and
denominator; the losses load through verl's external-module option in a fresh interpreter; the "dsrl" fused-kernel
backend, installed through verl's own `apply_monkey_patch`, gives verl's torch backend's log-probs, entropy and
gradients on a tiny Qwen3; `marginal_batch` builds the PreRL rows.
Not covered (verl's trainer needs Ray workers, FSDP on GPUs and a vLLM/SGLang rollout server): a PPO step of
verl's own trainer; the marginal phase's trainer subclass is documented in the module, not shipped.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl", reason="the verl integration needs verl (pip install --no-deps verl==0.9.1)")

from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig

from dsrl_fast.integrations import verl as dsrl_verl

B, T = 6, 9


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    dsrl_verl.register()


def actor_config(**info) -> ActorConfig:
    config = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5,
                         ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1)
    config.global_batch_info.update(info)
    return config


def verl_batch() -> dict[str, torch.Tensor]:
    lengths = torch.tensor([9, 4, 1, 0, 7, 5])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    log_prob = (-torch.rand(B, T, dtype=torch.float64) * 2).float().requires_grad_()
    adv = torch.tensor([1.2, -0.8, 0.5, -0.3, -1.5, 0.0])[:, None].expand(B, T).contiguous()
    return {"old_log_prob": (log_prob.detach() + 0.5 * torch.randn(B, T)), "log_prob": log_prob, "advantages": adv,
                "response_mask": mask, "rollout_is_weights": torch.rand(B, T) * 1.5}


INFOS = {"local": {}, "global": {"dp_size": 2, "batch_num_tokens": 41, "global_batch_size": 11}}


@pytest.mark.parametrize("agg", dsrl_verl.AGGREGATIONS)
@pytest.mark.parametrize("info", list(INFOS))
def test_dsrl_loss_equals_vanilla(agg: str, info: str) -> None:
    batch = verl_batch()
    results = []
    for name in ("vanilla", "dsrl"):
        fn = core_algos.get_policy_loss_fn(name)
        loss, metrics = fn(**batch, loss_agg_mode=agg, config=actor_config(**INFOS[info]))
        (grad,) = torch.autograd.grad(loss, batch["log_prob"])
        results.append((loss.detach(), grad, metrics))
    (want, want_grad, want_metrics), (got, got_grad, got_metrics) = results
    assert want.abs() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    assert got_metrics["actor/pg_clipfrac"] == pytest.approx(want_metrics["actor/pg_clipfrac"], abs=1e-6)


@pytest.mark.parametrize(("name", "keep"), [("nsr", lambda a: a < 0), ("psr", lambda a: a > 0)])
def test_nsr_psr_drop_other_sequences(name: str, keep) -> None:
    """NSR/PSR equal verl's vanilla loss on the kept rows alone (token-mean over the kept tokens)."""
    batch = verl_batch()
    got, _ = core_algos.get_policy_loss_fn(name)(**batch, loss_agg_mode="token-mean", config=actor_config())
    rows = keep(batch["advantages"][:, 0]) & (batch["response_mask"].sum(-1) > 0)
    sub = {k: v[rows] for k, v in batch.items()}
    want, _ = core_algos.get_policy_loss_fn("vanilla")(**sub, loss_agg_mode="token-mean", config=actor_config())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    scaled, _ = core_algos.get_policy_loss_fn("nsr_prerl")(**batch, loss_agg_mode="token-mean",
                                                            config=actor_config())
    if name == "nsr":
        torch.testing.assert_close(scaled, 0.01 * got, rtol=1e-5, atol=1e-9)


def test_loaded_by_verl_external_modules_option() -> None:
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="dsrl_fast.integrations.verl_plugin")
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
            "print(sorted(k for k in POLICY_LOSS_REGISTRY if k in ('dsrl', 'nsr', 'psr', 'nsr_prerl')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['dsrl', 'nsr', 'nsr_prerl', 'psr']"


def test_fused_backend_equals_verl_torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    from verl.models.transformers import monkey_patch

    # verl 0.9.1's apply_monkey_patch imports trl's PPO value-head model whenever trl is installed, and trl 1.16 no
    # longer has it (ImportError): with both peers in one environment, hide trl from that check.
    monkeypatch.setattr(monkey_patch, "is_trl_available", lambda: False)
    apply_monkey_patch = monkey_patch.apply_monkey_patch

    cfg = transformers.Qwen3Config(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = transformers.Qwen3ForCausalLM(cfg).float()
    ids = torch.randint(0, 257, (3, 11))
    original_forward = transformers.Qwen3ForCausalLM.forward
    outputs = {}
    try:
        for backend in ("torch", dsrl_verl.BACKEND):
            model = copy.deepcopy(base)
            apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True,
                               fused_kernels_backend=backend)
            out = model(input_ids=ids, temperature=0.7, return_dict=True)
            (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
            outputs[backend] = (out.log_probs.detach(), out.entropy.detach(),
                                [p.grad for p in model.parameters()])
    finally:
        transformers.Qwen3ForCausalLM.forward = original_forward  # verl patches the class
    (lp_t, ent_t, grads_t), (lp_d, ent_d, grads_d) = outputs["torch"], outputs[dsrl_verl.BACKEND]
    assert lp_d.shape == (3, 11)
    torch.testing.assert_close(lp_d, lp_t, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent_d, ent_t, rtol=1e-5, atol=2e-5)
    for got, want in zip(grads_d, grads_t):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_marginal_batch_layout() -> None:
    responses = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    ids, attn, pos = dsrl_verl.marginal_batch(responses, mask, (151644,))
    assert ids.tolist() == [[151644, 5, 6, 7, 0], [151644, 8, 0, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert pos[:, :3].tolist() == [[0, 1, 2], [0, 1, 1]]
    with pytest.raises(ValueError, match="prefix must be a non-empty tuple"):
        dsrl_verl.marginal_batch(responses, mask, ())


def test_rejects_token_sum_and_bad_options() -> None:
    batch = verl_batch()
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        core_algos.get_policy_loss_fn("dsrl")(**batch, loss_agg_mode="token-sum", config=actor_config())
    with pytest.raises(ValueError, match="samples must be one of"):
        dsrl_verl.make_policy_loss("neg")
