"""verl integration against the real verl 0.9.1 package, in an environment built from verl's own requirements.

`make test` runs this file in .venv-verl (dsrl_fast[verl]: verl[verl-core] 0.9.1 with transformers <5.11,
tensordict 0.10, trl 0.27.0 as verl[fsdp] pins it, and torch 2.13.0 CPU); in .venv (trl 1.16) it skips. Nothing of
verl is patched. Run here on CPU: the registered "dsrl" loss and its gradient equal verl's own "vanilla" loss (dual
clip, clip-higher, rollout IS weights) for every loss_agg_mode, with and without verl's global batch normalizers;
"nsr"/"psr" are verl's vanilla loss with the other sequences' loss weight zeroed; through verl's own per-micro-batch
actor loss (`verl.workers.utils.losses.ppo_loss`) on micro-batches split by verl's `prepare_micro_batches`, with the
normalizers that verl's FSDP engine computes, 1 and 4 micro-batches give the same gradient (NSR, PSR, the marginal
phase); the losses, trainer and worker hook load through verl's external-lib loader; DSRLPPOTrainer built by verl's
own constructor on verl's composed default config runs in verl's synchronous mode; the "dsrl" fused-kernel backend,
installed through verl's own `apply_monkey_patch` (with trl 0.27 installed, as in verl's FSDP environment), gives
verl's torch backend's log-probs, entropy and gradients on a tiny Qwen3; `marginal_batch` builds the PreRL rows; the
marginal phase's rows, loss and gradients on verl's v1 batch layout against a float64 reference.
Stand-ins, each said where it is used: a row-by-row Hugging Face forward for verl's engine forward (`model_output`),
a recorder for the body of `TrainingWorker.train_mini_batch` in the hook's dispatch test.
Not run here (verl's workers need GPUs for FSDP and a vLLM/SGLang rollout server): a training step through verl's FSDP
engine and a DSRLPPOTrainer.fit; the launch itself is tested up to worker placement in test_integrations_verl_launch.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

pytest.importorskip("verl", reason="verl 0.9.1 pins transformers <5.11 and trl 0.27, so its tests run in .venv-verl "
                    "(make test-verl; pip install 'dsrl_fast[verl]')")

from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig

from dsrl_fast import PolicyLossConfig
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


@pytest.mark.parametrize("agg", dsrl_verl.AGGREGATIONS)
@pytest.mark.parametrize("info", list(INFOS))
@pytest.mark.parametrize(("name", "keep"), [("nsr", lambda a: a < 0), ("psr", lambda a: a > 0)])
def test_nsr_psr_are_vanilla_with_the_other_sequences_zeroed(name: str, keep, agg: str, info: str) -> None:
    """NSR/PSR equal verl's vanilla loss (value and gradient) with the dropped sequences' advantages set to 0: they
    add nothing to the numerator and stay in verl's normalizer, local or global; nsr_prerl is nsr x 0.01."""
    batch = verl_batch()
    got, _ = core_algos.get_policy_loss_fn(name)(**batch, loss_agg_mode=agg, config=actor_config(**INFOS[info]))
    (got_grad,) = torch.autograd.grad(got, batch["log_prob"])
    zeroed = dict(batch, advantages=torch.where(keep(batch["advantages"]), batch["advantages"], 0.0))
    want, _ = core_algos.get_policy_loss_fn("vanilla")(**zeroed, loss_agg_mode=agg,
                                                        config=actor_config(**INFOS[info]))
    (want_grad,) = torch.autograd.grad(want, batch["log_prob"])
    assert want.abs() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    if name == "nsr":
        scaled, _ = core_algos.get_policy_loss_fn("nsr_prerl")(**batch, loss_agg_mode=agg,
                                                                config=actor_config(**INFOS[info]))
        torch.testing.assert_close(scaled, 0.01 * got, rtol=1e-5, atol=1e-9)


def test_loaded_by_verl_external_lib_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """verl's own loader (import_external_libs: what `external_lib` and VERL_USE_EXTERNAL_MODULES call) registers the
    losses, the "dsrl" v1 trainer and the worker hook, here in-process on emptied registries."""
    from verl.trainer.ppo.v1 import trainer_base
    from verl.utils.import_utils import import_external_libs
    from verl.workers.engine_workers import TrainingWorker

    names = ("dsrl", "nsr", "psr", "nsr_prerl")
    for name in names:
        monkeypatch.delitem(core_algos.POLICY_LOSS_REGISTRY, name, raising=False)
    monkeypatch.delitem(trainer_base.TRAINER_REGISTRY, "dsrl", raising=False)
    monkeypatch.setattr(TrainingWorker, "train_mini_batch", TrainingWorker.train_mini_batch)
    monkeypatch.delitem(sys.modules, "dsrl_fast.integrations.verl_plugin", raising=False)
    import_external_libs("dsrl_fast.integrations.verl_plugin")
    assert set(names) <= set(core_algos.POLICY_LOSS_REGISTRY)
    assert trainer_base.get_trainer_cls("dsrl").__name__ == "DSRLPPOTrainer"
    assert getattr(TrainingWorker.train_mini_batch, "_dsrl_fast", False)


def test_fused_backend_equals_verl_torch_backend() -> None:
    """verl's apply_monkey_patch as its FSDP engine calls it at every model build: with trl installed (verl[fsdp]
    pins 0.27.0) it also patches trl's value-head model, which is why verl cannot run beside trl 1.16."""
    import transformers
    from verl.models.transformers.monkey_patch import apply_monkey_patch
    from verl.utils.import_utils import is_trl_available

    assert is_trl_available()

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


# ---- micro-batch invariance: verl back-propagates each micro-batch unscaled and normalizes globally ----------------
# The loop below is FSDPEngine.forward_backward_batch's (verl's code needs a CUDA device there, get_device_id): the
# token count of the mini-batch's loss_mask as `batch_num_tokens` (one rank: its all-reduce is the identity),
# dp_size and the trainer's global_batch_size as non-tensor data, verl's own `prepare_micro_batches` split, then per
# micro-batch the actor loss verl's TrainingWorker uses (`ppo_loss`, which looks our loss up by loss_mode) or our
# marginal loss, and an unscaled backward. The model forward is a stand-in (row by row, `_engine_log_probs`).

MINI_RESPONSES = [[5, 9, 11, 3, 8], [12, 4], [6, 6, 10, 2], [3], [9, 14, 2], [7, 7], [13, 2, 5, 6, 8, 9], [4, 10, 3]]
MINI_ADVANTAGES = [-0.7, 0.9, -1.3, 0.4, 0.6, -0.2, 1.1, -0.9]  # rows 3-4 form a micro-batch with no negative row


def mini_batch(model: torch.nn.Module):
    """verl's v1 mini-batch of 8 rows with old log-probs from `model` (a perturbed copy: ratios away from 1)."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    torch.manual_seed(11)
    rows = []
    for response, adv in zip(MINI_RESPONSES, MINI_ADVANTAGES):
        prompt = torch.randint(1, 60, (int(torch.randint(2, 5, ())),))
        resp = torch.tensor(response)
        mask = torch.ones_like(resp)
        rows.append({"prompts": prompt, "responses": resp, "response_mask": mask, "loss_mask": mask,
                     "input_ids": torch.cat([prompt, resp]), "position_ids": torch.arange(len(prompt) + len(resp)),
                     "advantages": torch.full((len(response),), adv)})
    data = list_of_dict_to_tensordict(rows)
    with torch.no_grad():
        logp = _engine_log_probs(model, data["input_ids"], data["position_ids"])
    old = [row[len(p) - 1:len(p) - 1 + len(r)] + 0.3 * torch.randn(len(r))
           for row, p, r in zip(logp.unbind(), data["prompts"].unbind(), data["responses"].unbind())]
    data["old_log_probs"] = torch.nested.as_nested_tensor(old, layout=torch.jagged)
    return data


def accumulated_gradient(model: torch.nn.Module, data, loss_function, micro_batches: int) -> torch.Tensor:
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.utils import prepare_micro_batches

    model.zero_grad()
    tu.assign_non_tensor(data, batch_num_tokens=int(data["loss_mask"].values().sum()), dp_size=1,
                         global_batch_size=len(data), use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=len(data) // micro_batches)
    parts, _ = prepare_micro_batches(data=data, dp_group=None)
    assert len(parts) == micro_batches
    for part in parts:
        output = {"log_probs": _engine_log_probs(model, part["input_ids"], part["position_ids"])}
        loss, _ = loss_function(model_output=output, data=part, dp_group=None)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("loss_mode", ["nsr", "psr"])
def test_one_and_four_micro_batches_give_one_gradient(marginal, loss_mode: str, agg: str) -> None:
    import functools

    from verl.workers.config import PolicyLossConfig as VerlPolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    model = _tiny_qwen3()
    old_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in old_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5,
                         ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=8, rollout_n=1, loss_agg_mode=agg,
                         policy_loss=VerlPolicyLossConfig(loss_mode=loss_mode))
    loss_function = functools.partial(ppo_loss, config)
    whole = accumulated_gradient(model, mini_batch(old_model), loss_function, 1)
    split = accumulated_gradient(model, mini_batch(old_model), loss_function, 4)
    assert whole.norm() > 0
    assert ((split - whole).norm() / whole.norm()).item() < 1e-5


def test_marginal_phase_one_and_four_micro_batches_give_one_gradient(marginal) -> None:
    """The marginal rows (NSR on log p(y | prefix)) with verl's global count of the kept tokens: the hook zeroes the
    dropped rows' loss_mask before verl counts the mini-batch's tokens."""
    import functools

    model = _tiny_qwen3()
    loss_function = functools.partial(marginal.marginal_policy_loss,
                                      config=PolicyLossConfig(samples="negative", loss_scale=0.01))
    grads = [accumulated_gradient(model, marginal.marginal_rows(mini_batch(model), PREFIX), loss_function, n)
             for n in (1, 4)]
    assert grads[0].norm() > 0
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-5


# ---- the marginal (PreRL) phase: DSRLPPOTrainer + the TrainingWorker hook ----------------------------------------
# Run here: the worker-side data transformation and loss on verl's own v1 batch layout (a TensorDict of jagged
# tensors built with verl's list_of_dict_to_tensordict, as its agent loop writes it to the TransferQueue), the
# response slicing by verl's own no_padding_2_padding, loss and gradients against a float64 reference on a tiny
# Qwen3; the hook's dispatch (flag popped, rows rebuilt, loss swapped and restored, on-policy check) around a
# stand-in for verl's engine; the driver's flag per step. Not run (verl's v1 trainer needs Ray, the TransferQueue
# service, FSDP on GPUs and a vLLM/SGLang server): a real `train_mini_batch` through verl's FSDP engine and a
# DSRLPPOTrainer.fit.


@pytest.fixture(scope="module")
def marginal():
    from dsrl_fast.integrations import verl_marginal

    return verl_marginal


PREFIX = (7,)
RESPONSES = [[5, 9, 11, 3, 8], [12, 4], [6, 6, 10, 2], [3], [9, 14, 2]]
ADVANTAGES = [-0.7, 0.9, -1.3, 0.0, -0.4]


def v1_batch():
    """verl's v1 worker batch: prompts/responses/masks/positions/advantages as its agent loop and driver write them."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    torch.manual_seed(5)
    rows = []
    for response, adv in zip(RESPONSES, ADVANTAGES):
        prompt = torch.randint(1, 60, (int(torch.randint(2, 6, ())),))
        resp = torch.tensor(response)
        mask = torch.ones_like(resp)
        mask[-1:] = 0 if len(response) == 4 else 1  # a tool/padding token inside one response
        rows.append({"prompts": prompt, "responses": resp, "response_mask": mask, "loss_mask": mask,
                     "input_ids": torch.cat([prompt, resp]), "position_ids": torch.arange(len(prompt) + len(resp)),
                     "advantages": torch.full((len(response),), adv)})
    return list_of_dict_to_tensordict(rows)


def test_marginal_rows_layout(marginal) -> None:
    data = marginal.marginal_rows(v1_batch(), PREFIX)
    ids = [r.tolist() for r in data["input_ids"].unbind()]
    assert ids == [list(PREFIX) + r for r in RESPONSES]
    assert [r.tolist() for r in data["position_ids"].unbind()] == [list(range(len(r) + 1)) for r in RESPONSES]
    assert [r.tolist() for r in data["prompts"].unbind()] == [list(PREFIX)] * len(RESPONSES)
    kept = [m.sum().item() for m in data["loss_mask"].unbind()]
    assert kept == [5, 0, 3, 0, 3]  # NSR: rows with A >= 0 leave numerator and denominator
    assert [m.sum().item() for m in data["response_mask"].unbind()] == kept
    with pytest.raises(ValueError, match="prefix must be a non-empty tuple"):
        marginal.marginal_rows(v1_batch(), ())


def _tiny_qwen3() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(vocab_size=67, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(2)
    return transformers.Qwen3ForCausalLM(cfg).float()


def _engine_log_probs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """verl's model_output["log_probs"] contract: (B, j) jagged next-token log-probs of each row (row by row here)."""
    rows = []
    for ids, pos in zip(input_ids.unbind(), position_ids.unbind()):
        logits = model(input_ids=ids[None], position_ids=pos[None]).logits[0].float()
        labels = torch.roll(ids, -1)
        rows.append(torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1))
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def test_marginal_loss_and_gradients_equal_float64_reference(marginal) -> None:
    """The worker's marginal loss on verl's layout: NSR on log p(y | prefix), on-policy, x loss_scale, divided by
    the kept tokens; loss within 1e-5 relative and gradients within 1e-4 relative (Frobenius) of float64."""
    from verl.utils import tensordict_utils as tu

    model = _tiny_qwen3()
    data = marginal.marginal_rows(v1_batch(), PREFIX)
    tu.assign_non_tensor(data, batch_num_tokens=int(data["loss_mask"].values().sum()), dp_size=1)
    config = PolicyLossConfig(samples="negative", loss_scale=0.01)
    output = {"log_probs": _engine_log_probs(model, data["input_ids"], data["position_ids"])}
    loss, metrics = marginal.marginal_policy_loss(output, data, config=config)
    loss.backward()
    got_grads = torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    ref_model = copy.deepcopy(model).double()
    ref_model.zero_grad()
    want, count = torch.zeros((), dtype=torch.float64), 0
    for response, adv in zip(RESPONSES, ADVANTAGES):
        if adv >= 0:
            continue
        ids = torch.tensor([list(PREFIX) + response])
        logp = torch.log_softmax(ref_model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])
        n = len(response) - (1 if len(response) == 4 else 0)
        ratio = torch.exp(logp[:n] - logp[:n].detach())  # on-policy PPO: value -A per token, gradient -A grad logp
        want = want - adv * ratio.sum()
        count += n
    want = 0.01 * want / count
    want.backward()
    want_grads = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
    assert metrics["actor/dsrl_kept_tokens"] == count == 11
    torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=1e-5, atol=1e-9)
    assert want_grads.norm() > 0
    assert ((got_grads - want_grads).norm() / want_grads.norm()).item() < 1e-4


def test_worker_hook_runs_marginal_batches_with_the_marginal_loss(marginal, monkeypatch) -> None:
    import types

    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import TrainingWorker

    seen = []

    def stand_in(self, data):  # verl's train_mini_batch minus the engine: records what it would train on
        seen.append(([r.tolist() for r in data["input_ids"].unbind()], self.loss_fn))
        return "trained"

    monkeypatch.setattr(TrainingWorker, "train_mini_batch", stand_in)
    marginal.install_worker_hook()
    hooked = TrainingWorker.train_mini_batch
    marginal.install_worker_hook()
    assert TrainingWorker.train_mini_batch is hooked and hooked.__wrapped__ is stand_in
    verl_loss = object()
    worker = types.SimpleNamespace(loss_fn=verl_loss, engine=types.SimpleNamespace(get_data_parallel_size=lambda: 1))

    plain = v1_batch()
    assert hooked(worker, data=plain) == "trained"
    assert seen[-1][1] is verl_loss and seen[-1][0][0] != list(PREFIX) + RESPONSES[0]

    flagged = v1_batch()
    tu.assign_non_tensor(flagged, mini_batch_size=5, epochs=1, **{marginal.FLAG: {"prefix": [7], "loss_scale": 0.5}})
    assert hooked(worker, data=flagged) == "trained"
    ids, loss_fn = seen[-1]
    assert ids == [list(PREFIX) + r for r in RESPONSES]
    assert loss_fn.func is marginal.marginal_policy_loss
    assert loss_fn.keywords["config"].samples == "negative" and loss_fn.keywords["config"].loss_scale == 0.5
    assert worker.loss_fn is verl_loss  # restored

    off_policy = v1_batch()
    tu.assign_non_tensor(off_policy, mini_batch_size=2, epochs=1, **{marginal.FLAG: {"prefix": [7], "loss_scale": 1}})
    with pytest.raises(ValueError, match="the marginal phase is on-policy"):
        hooked(worker, data=off_policy)


def test_trainer_flags_the_first_switch_step_updates(marginal, monkeypatch) -> None:
    import types

    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    flags = []
    monkeypatch.setattr(PPOTrainerSync, "_update_actor",
                        lambda self, batch, metrics: flags.append(dict(batch.extra_info).get(marginal.FLAG)))
    trainer = object.__new__(marginal.DSRLPPOTrainer)  # fit() needs Ray; only the per-step decision is run
    trainer.dsrl_options = marginal.marginal_options({"dsrl": {"switch_step": 2, "prefix": [151644]}})
    batch = types.SimpleNamespace(extra_info={})
    metrics = {}
    for step in (1, 2, 3):
        trainer.global_steps = step
        trainer._update_actor(batch, metrics)
    assert flags == [{"prefix": [151644], "loss_scale": 0.01}] * 2 + [None]
    assert metrics["dsrl/marginal_phase"] == 0.0 and marginal.FLAG not in batch.extra_info
    with pytest.raises(ValueError, match="dsrl options must be among"):
        marginal.marginal_options({"dsrl": {"switch": 3}})
    with pytest.raises(ValueError, match="switch_step must be an int >= 0"):
        marginal.marginal_options({"dsrl": {"switch_step": -1}})


def composed_config(*overrides: str):
    """verl's own ppo_trainer config, composed by Hydra as `python -m verl.trainer.main_ppo <overrides>` does."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def test_dsrl_trainer_runs_as_verls_synchronous_trainer(marginal) -> None:
    """verl's TaskRunnerV1 looks the trainer up by trainer.v1.trainer_mode and verl's constructor branches on the same
    name: built by verl's own constructor, the "dsrl" trainer takes verl's synchronous replay buffer, where verl's
    sync trainer given the mode name "dsrl" takes the asynchronous one."""
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    marginal.install()
    overrides = ("trainer.v1.trainer_mode=dsrl", "+dsrl.switch_step=3", "algorithm.adv_estimator=grpo")
    config = composed_config(*overrides)
    trainer = get_trainer_cls(config.trainer.v1.trainer_mode)(config=config)
    assert isinstance(trainer, marginal.DSRLPPOTrainer)
    assert trainer.trainer_mode == config.trainer.v1.trainer_mode == "sync"
    assert type(trainer.replay_buffer) is ReplayBuffer
    assert trainer.dsrl_options["switch_step"] == 3
    assert type(PPOTrainerSync(config=composed_config(*overrides)).replay_buffer) is ReplayBufferAsync
