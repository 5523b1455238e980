"""TRL integration against the real trl 1.16 package on CPU with the tiny Qwen3 and toy tokenizer.

Covered here: the DSRLGRPOTrainer loss and gradients equal TRL's own `_compute_loss` for loss_type grpo / bnpo /
dr_grpo / dapo (KL on and off, off-policy old log-probs, vLLM importance weights, gradient accumulation); two real
GRPOTrainer optimizer steps with our loss land on the same weights as TRL's; the DSRL switch runs NSR on the marginal
space first, also on a LoRA model. Not covered (no GPU, no vLLM server, one process): ZeRO-3 head gathering, Triton
log-probs.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'dsrl_fast[integrations]')")
datasets = pytest.importorskip("datasets", reason="TRL's trainer needs datasets")

from trl import GRPOConfig, GRPOTrainer

from dsrl_fast.integrations.trl import DSRLGRPOTrainer, DSRLOptions
from dsrl_fast.toy import IM_START, build_tiny_qwen3, build_toy_tokenizer, make_addition_problems, save_tiny_model

MAX_COMPLETION = 7


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def tiny_model(tokenizer) -> torch.nn.Module:
    return build_tiny_qwen3(len(tokenizer), seed=3, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def digit_reward(completions: list[str], **_: object) -> list[float]:
    """A reward with spread on an untrained model: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def make_args(tmp_path, **overrides) -> GRPOConfig:
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_generations": 4,
                "max_completion_length": MAX_COMPLETION, "max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1,
                "report_to": "none", "use_cpu": True, "save_strategy": "no", "beta": 0.0, "seed": 7, "bf16": False,
                "disable_tqdm": True}
    base.update(overrides)
    return GRPOConfig(**base)


def dataset():
    return datasets.Dataset.from_list([{"prompt": p.prompt_text} for p in make_addition_problems(12, seed=1)])


def build(cls, tokenizer, tmp_path, model, **kwargs):
    return cls(model=model, reward_funcs=digit_reward, args=make_args(tmp_path, **kwargs.pop("args", {})),
               train_dataset=dataset(), processing_class=tokenizer, **kwargs)


def loss_inputs(tokenizer, batch: int = 5) -> dict[str, torch.Tensor]:
    """A hand-made micro-batch in TRL's layout: left-padded prompts, right-padded completions, off-policy."""
    prompt_ids = torch.randint(5, len(tokenizer), (batch, 4))
    prompt_mask = torch.ones(batch, 4, dtype=torch.long)
    prompt_mask[1, :2] = 0
    completion_ids = torch.randint(5, len(tokenizer), (batch, MAX_COMPLETION))
    lengths = torch.tensor([7, 3, 1, 5, 6])[:batch]
    completion_mask = (torch.arange(MAX_COMPLETION)[None] < lengths[:, None]).long()
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.tensor([1.1, -0.4, 0.0, -1.3, 0.6])[:batch],
        "num_items_in_batch": completion_mask.sum() * 3.0,
        "importance_sampling_ratio": torch.rand(batch, MAX_COMPLETION) * 1.5,
    }


def run_loss(trainer, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradients_equal_trl(tokenizer, tmp_path, loss_type: str, beta: float) -> None:
    # with beta > 0 TRL loads a reference model from the policy's path, so both trainers load a saved tiny model
    path = str(save_tiny_model(tiny_model(tokenizer), tokenizer, tmp_path / "model"))
    kwargs = {"args": {"loss_type": loss_type, "beta": beta, "epsilon": 0.2, "epsilon_high": 0.28,
                            "use_bias_correction_kl": False, "steps_per_generation": 2}}
    theirs = build(GRPOTrainer, tokenizer, tmp_path, path, **copy.deepcopy(kwargs))
    ours = build(DSRLGRPOTrainer, tokenizer, tmp_path, path, dsrl=DSRLOptions(impl="torch"), **kwargs)
    inputs = loss_inputs(tokenizer)
    with torch.no_grad():  # behaviour and reference log-probs: the current policy, perturbed
        full = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, _, _ = theirs._get_per_token_logps_and_entropies(theirs.model, full, mask, MAX_COMPLETION)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn_like(logps)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn_like(logps)
    for trainer in (theirs, ours):
        trainer.use_vllm = True  # TRL applies importance_sampling_ratio only with vLLM; the loss path is the same
        trainer.current_gradient_accumulation_steps = 2
        trainer.model.train()
    want_loss, want_grads = run_loss(theirs, inputs)
    got_loss, got_grads = run_loss(ours, inputs)
    assert want_loss.abs() > 1e-4  # the comparison is not vacuous
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want_grads[0].abs().max().item() + 1e-8)


def test_two_grpo_steps_match_trl(tokenizer, tmp_path) -> None:
    """Same seed, same sampled completions: two optimizer steps of our loss give TRL's weights."""
    base = tiny_model(tokenizer)
    args = {"loss_type": "dapo", "beta": 0.0}
    theirs = build(GRPOTrainer, tokenizer, tmp_path / "trl", copy.deepcopy(base), args=dict(args))
    theirs.train()
    ours = build(DSRLGRPOTrainer, tokenizer, tmp_path / "dsrl", copy.deepcopy(base), args=dict(args),
                 dsrl=DSRLOptions(impl="torch"))
    ours.train()
    moved = max((p - q).abs().max().item() for p, q in zip(ours.model.parameters(), base.parameters()))
    assert moved > 1e-4, "the two steps changed nothing"
    # Adam turns a gradient element near 0 into a ±lr step, so fp32 noise there moves a rare weight by up to ~lr;
    # every other weight agrees to float precision
    lr = theirs.args.learning_rate
    diffs = torch.cat([(p - q).abs().flatten() for p, q in zip(ours.model.parameters(), theirs.model.parameters())])
    assert diffs.max().item() <= 0.1 * lr, f"max weight difference {diffs.max().item():.2e}"
    assert (diffs > 1e-6).float().mean().item() < 1e-3, f"{(diffs > 1e-6).sum().item()} weights differ by > 1e-6"
    rewards = [h["reward"] for h in theirs.state.log_history if "reward" in h]
    assert rewards == [h["reward"] for h in ours.state.log_history if "reward" in h]


def test_dsrl_switch_runs_marginal_nsr_then_grpo(tokenizer, tmp_path) -> None:
    prefix = (tokenizer.convert_tokens_to_ids(IM_START),)
    trainer = build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer), args={"max_steps": 2},
                    dsrl=DSRLOptions(switch_step=1, marginal_prefix=prefix, impl="torch"))
    base = copy.deepcopy(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "dsrl/marginal_phase" in h]
    assert [h["dsrl/marginal_phase"] for h in logs] == [1.0, 0.0]
    # NSR keeps only negative-advantage completions: fewer tokens than GRPO's all-sample phase keeps
    assert all(h["dsrl/kept_tokens"] < h["num_tokens"] for h in logs)
    assert logs[0]["dsrl/kept_tokens"] > 0
    moved = max((p - q).abs().max().item() for p, q in zip(trainer.model.parameters(), base.parameters()))
    assert moved > 1e-4
    assert trainer.model.config._attn_implementation == base.config._attn_implementation


def test_marginal_loss_uses_prefix_context(tokenizer, tmp_path) -> None:
    """In the marginal phase the log-probs are those of [prefix; y] from position 0, not of [x; y], and the loss is
    built on them (off-policy, so the ratio depends on their values)."""
    prefix = (tokenizer.convert_tokens_to_ids(IM_START),)
    trainer = build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer),
                    dsrl=DSRLOptions(switch_step=5, marginal_prefix=prefix, marginal_loss_scale=1.0,
                                     denominator="kept", impl="torch"))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.eval()
    inputs = loss_inputs(tokenizer)
    inputs.pop("importance_sampling_ratio")
    with torch.no_grad():
        reference = torch.zeros(inputs["completion_ids"].shape, dtype=torch.float64)
        for row in range(5):
            n = int(inputs["completion_mask"][row].sum())
            ids = torch.tensor([list(prefix) + inputs["completion_ids"][row, :n].tolist()])
            logits = trainer.model(input_ids=ids).logits[0, :-1].double()
            reference[row, :n] = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
        logps, _ = trainer._marginal_logps(trainer.model, inputs)
        mask = inputs["completion_mask"].bool()
        torch.testing.assert_close(logps.double()[mask], reference[mask], rtol=1e-5, atol=1e-5)

        # old log-probs 0.1 below the float64 reference: every kept token's ratio is exp(logp - reference + 0.1),
        # e^0.1 inside the clip range when logp is right
        inputs["old_marginal_logps"] = (reference - 0.1).float()
        got = trainer._compute_loss(trainer.model, inputs)
        negative = (inputs["advantages"] < 0)[:, None] & mask
        assert negative.any()
        ratio = torch.exp(logps.double() - reference + 0.1)
        want = (-inputs["advantages"].double()[:, None] * ratio)[negative].sum() / negative.sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ratio[negative], torch.full_like(ratio[negative], 0.1).exp(), rtol=1e-4, atol=1e-4)


def test_lora_model_runs_the_switch_and_trains_only_the_adapters(tokenizer, tmp_path) -> None:
    peft = pytest.importorskip("peft", reason="the PEFT path needs peft")
    prefix = (tokenizer.convert_tokens_to_ids(IM_START),)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer), args={"max_steps": 2},
                    peft_config=lora, dsrl=DSRLOptions(switch_step=1, marginal_prefix=prefix, impl="torch"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "dsrl/marginal_phase" in h]
    assert [h["dsrl/marginal_phase"] for h in logs] == [1.0, 0.0] and logs[0]["dsrl/kept_tokens"] > 0
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)


def test_a_marginal_prefix_outside_the_vocabulary_is_refused(tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"DSRLOptions.marginal_prefix must hold token ids below the model's "
                                         r"vocabulary size \d+ .*got \(151644,\)"):
        build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer), dsrl=DSRLOptions(switch_step=1))


def test_rejects_unsupported_options(tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="top_entropy_quantile=0.5"):
        build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer), args={"top_entropy_quantile": 0.5})
    with pytest.raises(ValueError, match="loss_type must be one of"):
        build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer), args={"loss_type": "sapo"})
    with pytest.raises(ValueError, match="switch_step must be an int >= 0"):
        DSRLOptions(switch_step=-1)
