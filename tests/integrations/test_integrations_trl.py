"""TRL integration against the real trl 1.16 package on CPU with the tiny Qwen3 and toy tokenizer.

Covered here: the DSRLGRPOTrainer loss and gradients equal TRL's own `_compute_loss` for loss_type grpo / bnpo /
dr_grpo / dapo (KL off, KL with and without TRL's bias correction, off-policy old log-probs, vLLM importance weights
in token and sequence modes, gradient accumulation); two real GRPOTrainer optimizer steps with our loss land on the
same weights as TRL's; the README's swap with TRL's GRPOConfig defaults (KL on) and no marginal_prefix runs the DSRL
switch (NSR on the marginal space first), also on a LoRA model; vLLM importance ratios leave the marginal loss alone;
ZeRO-3 under a real `accelerate launch` (DeepSpeed ZeRO-3, 2 processes, CPU/gloo; see `zero3_run`) and an FSDP2
DTensor head in the same 2-process group. Not covered (no GPU, no vLLM server): a vLLM-generated run (its
importance ratios are fed in by hand), FSDP2 through accelerate's launcher (only the DTensor head call is run), the
Triton log-probs (CPU runs impl="torch").
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'dsrl_fast[integrations]')")
datasets = pytest.importorskip("datasets", reason="TRL's trainer needs datasets")

from trl import GRPOConfig, GRPOTrainer

from dsrl_fast.integrations.trl import DSRLGRPOTrainer, DSRLOptions
from dsrl_fast.data.toy import IM_START, build_toy_tokenizer, make_addition_problems
from dsrl_fast.model.tiny import build_tiny_qwen3, save_tiny_model
from tests.paths import REPO_ROOT

MAX_COMPLETION = 7
ROOT = REPO_ROOT


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


LOSS_CASES = [(loss_type, 0.0, False, "token_truncate") for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")] + [
    (loss_type, 0.04, True, "sequence_mask") for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")] + [
    ("dapo", 0.04, False, "token_mask")]


@pytest.mark.parametrize(("loss_type", "beta", "bias_corrected_kl", "is_mode"), LOSS_CASES)
def test_loss_and_gradients_equal_trl(tokenizer, tmp_path, loss_type: str, beta: float, bias_corrected_kl: bool,
                                      is_mode: str) -> None:
    """Off-policy old log-probs, a perturbed reference, vLLM importance ratios (B, T) in TRL's token modes and (B, 1)
    in its sequence modes, gradient accumulation 2: loss and gradients equal TRL's `_compute_loss`."""
    # with beta > 0 TRL loads a reference model from the policy's path, so both trainers load a saved tiny model
    path = str(save_tiny_model(tiny_model(tokenizer), tokenizer, tmp_path / "model"))
    kwargs = {"args": {"loss_type": loss_type, "beta": beta, "epsilon": 0.2, "epsilon_high": 0.28,
                            "use_bias_correction_kl": bias_corrected_kl, "steps_per_generation": 2,
                            "vllm_importance_sampling_mode": is_mode}}
    theirs = build(GRPOTrainer, tokenizer, tmp_path, path, **copy.deepcopy(kwargs))
    ours = build(DSRLGRPOTrainer, tokenizer, tmp_path, path, dsrl=DSRLOptions(impl="torch"), **kwargs)
    inputs = loss_inputs(tokenizer)
    if is_mode.startswith("sequence"):
        inputs["importance_sampling_ratio"] = inputs["importance_sampling_ratio"][:, :1].contiguous()
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


def test_readme_swap_with_trl_defaults_runs_marginal_nsr_then_grpo(tokenizer, tmp_path) -> None:
    """The README's swap as written: GRPOConfig with TRL's defaults (loss_type "dapo", use_bias_correction_kl=True)
    plus beta > 0, only the sizes a CPU test needs, and DSRLOptions(switch_step=...) without marginal_prefix: the
    tokenizer's <|im_start|> becomes the marginal context, the KL runs bias-corrected after the switch."""
    path = str(save_tiny_model(tiny_model(tokenizer), tokenizer, tmp_path / "model"))
    args = GRPOConfig(output_dir=str(tmp_path / "run"), beta=0.04, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=MAX_COMPLETION, max_steps=2, learning_rate=1e-3, logging_steps=1,
                      report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    assert args.use_bias_correction_kl and args.loss_type == "dapo"
    trainer = DSRLGRPOTrainer(model=path, reward_funcs=digit_reward, args=args, train_dataset=dataset(),
                              processing_class=tokenizer, dsrl=DSRLOptions(switch_step=1))
    assert trainer.marginal_prefix == (tokenizer.convert_tokens_to_ids(IM_START),)
    assert trainer.loss_config.kl_ratio_weighted and trainer.loss_config.log_ratio_clamp is None
    base = copy.deepcopy(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "dsrl/marginal_phase" in h]
    assert [h["dsrl/marginal_phase"] for h in logs] == [1.0, 0.0]
    assert logs[0]["dsrl/kl_mean"] == 0.0 and logs[1]["dsrl/kl_mean"] > 0.0  # no KL in the marginal phase
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


def test_vllm_importance_ratios_weight_the_conditional_loss_only(tokenizer, tmp_path) -> None:
    """TRL's vLLM ratios π_old(y|x)/π_vLLM(y|x) are conditional: with them in the inputs (vLLM on, correction on)
    the marginal-phase loss and gradients are those without them; after the switch they weight the loss."""
    prefix = (tokenizer.convert_tokens_to_ids(IM_START),)
    trainer = build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer),
                    dsrl=DSRLOptions(switch_step=1, marginal_prefix=prefix, impl="torch"))
    trainer.use_vllm = True  # TRL reads the ratios only with vLLM; the loss path is the same
    assert trainer.vllm_importance_sampling_correction
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = loss_inputs(tokenizer)
    inputs["importance_sampling_ratio"] = 0.2 + 1.6 * torch.rand_like(inputs["importance_sampling_ratio"])
    without = {k: v for k, v in inputs.items() if k != "importance_sampling_ratio"}
    results = {}
    for step in (0, 1):  # the marginal phase, then the conditional one
        trainer.state.global_step = step
        for name, batch in (("with", inputs), ("without", without)):
            if name == "without":
                trainer.use_vllm = False
            results[step, name] = run_loss(trainer, batch)
            trainer.use_vllm = True
    (loss_w, grads_w), (loss_wo, grads_wo) = results[0, "with"], results[0, "without"]
    assert loss_w.abs() > 1e-6
    assert torch.equal(loss_w, loss_wo) and all(torch.equal(a, b) for a, b in zip(grads_w, grads_wo))
    assert (results[1, "with"][0] - results[1, "without"][0]).abs() > 1e-4


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
        build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer),
              dsrl=DSRLOptions(switch_step=1, marginal_prefix=(151644,)))


def test_rejects_unsupported_options(tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="top_entropy_quantile=0.5"):
        build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer), args={"top_entropy_quantile": 0.5})
    with pytest.raises(ValueError, match="loss_type must be one of"):
        build(DSRLGRPOTrainer, tokenizer, tmp_path, tiny_model(tokenizer), args={"loss_type": "sapo"})
    with pytest.raises(ValueError, match="switch_step must be an int >= 0"):
        DSRLOptions(switch_step=-1)


# ---- ZeRO-3 and FSDP2 under a real launch ------------------------------------------------------------------------
ZERO3_TIMEOUT_S = 600
ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {ds_config}
  zero3_init_flag: true
machine_rank: 0
num_machines: 1
num_processes: 2
use_cpu: false
"""
# every parameter partitioned (no persistence threshold), the rest filled in by accelerate from GRPOConfig
DEEPSPEED_CONFIG = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                    "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untied_tiny_model(tokenizer) -> torch.nn.Module:
    """The tiny Qwen3 with its own (peaked) LM head: under ZeRO-3 no module's hook ever gathers that weight for a
    fused head, unlike a head tied to the embedding."""
    tied = tiny_model(tokenizer)
    config = copy.deepcopy(tied.config)
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = type(tied)(config)
    model.generation_config = tied.generation_config
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def zero3_run(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """tests/trl_zero3_worker.py under `accelerate launch` with DeepSpeed ZeRO-3, 2 processes on CPU (gloo,
    DS_ACCELERATOR=cpu), as a TRL user launches a run: each rank's JSON (see the worker's docstring). ~30 s."""
    for module in ("deepspeed", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the ZeRO-3 launch needs {module} (pip install 'dsrl_fast[trl]'), which is not installed")
    tmp = tmp_path_factory.mktemp("trl_zero3")
    model_dir = save_tiny_model(untied_tiny_model(tokenizer), tokenizer, tmp / "model")
    (tmp / "ds.json").write_text(json.dumps(DEEPSPEED_CONFIG))
    (tmp / "accelerate.yaml").write_text(ACCELERATE_CONFIG.format(ds_config=tmp / "ds.json"))
    out = tmp / "out"
    out.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(tmp / "accelerate.yaml"), "--main_process_ip", "127.0.0.1", "--main_process_port",
               str(_free_port()), str(ROOT / "tests" / "trl_zero3_worker.py"), str(model_dir), str(out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ZERO3_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_zero3_reference_model_head_is_gathered(zero3_run: list[dict]) -> None:
    """beta > 0: TRL loads the reference model under ZeRO-3 and wraps it in a DeepSpeed engine before our head is
    patched in; its fused log-probs equal the float64 oracle (1e-5) with the head weight a 0-element shard."""
    for rank in zero3_run:
        assert rank["partitioned"]["ref"]
        assert rank["ref_logprob_err"] <= 1e-5, rank


def test_zero3_user_built_policy_trains_and_matches_the_oracle(zero3_run: list[dict]) -> None:
    """A policy built by the user (whole when patched, partitioned by deepspeed.initialize afterwards) runs the
    marginal NSR step and a GRPO + KL step; then its log-probs, entropy (1e-5) and every parameter's gradient
    (1e-5 relative, reduced over both ranks by DeepSpeed) equal the float64 oracle on the gathered weights."""
    for rank in zero3_run:
        assert rank["partitioned"] == {"policy_at_construction": False, "ref": True, "policy_after_training": True}
        assert [h["dsrl/marginal_phase"] for h in rank["log"]] == [1.0, 0.0]
        assert rank["log"][0]["dsrl/kept_tokens"] > 0 and rank["log"][1]["dsrl/kl_mean"] > 0
        assert rank["policy_logprob_err"] <= 1e-5 and rank["policy_entropy_err"] <= 1e-5, rank
        assert rank["policy_grad_rel_err"] <= 1e-5, rank
    assert zero3_run[0]["policy_grad_rel_err"] == zero3_run[1]["policy_grad_rel_err"]


def test_fsdp2_dtensor_head_is_gathered(zero3_run: list[dict], tokenizer) -> None:
    """A head weight sharded as a DTensor over the 2 ranks (FSDP2's layout): log-probs and the gathered gradient
    equal the plain weight's (the all-gather and reduce-scatter are exact in fp32 here)."""
    for rank in zero3_run:
        assert rank["dtensor_local_rows"] == len(tokenizer) // 2
        assert rank["dtensor_logprob_err"] <= 1e-6 and rank["dtensor_grad_rel_err"] <= 1e-6, rank
