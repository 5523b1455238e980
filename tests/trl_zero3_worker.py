"""One rank of the TRL ZeRO-3 check in tests/integrations/test_integrations_trl.py, as a TRL user launches it:

    accelerate launch --config_file ACCELERATE_YAML tests/trl_zero3_worker.py MODEL_DIR OUT_DIR

(the YAML selects DeepSpeed ZeRO-3, 2 processes; on CPU with DS_ACCELERATOR=cpu and gloo). The policy is built by
the user before any DeepSpeed config exists, so DeepSpeed partitions it only in `deepspeed.initialize` (after
DSRLGRPOTrainer patched it); the reference model (beta > 0) is loaded by TRL under ZeRO-3 and wrapped in a DeepSpeed
engine before DSRLGRPOTrainer patches it; steps_per_generation=2 makes TRL compute old log-probs (and DSRL the old
marginal ones) through the bare policy module. In these calls DeepSpeed 0.19's forward pre-hook on the root module
gathers the head weight by itself (its automatic discovery of parameters read outside their module); the `direct_*`
check removes that hook, so only the head's own gathering is left. Each rank writes OUT_DIR/rank{R}.json with:
- partitioned: whether each head weight was a ZeRO-3 shard (policy at construction, policy after training, ref);
- ref_logprob_err: the reference model's fused log-probs against a float64 full-logits oracle;
- log: DSRL's per-step log (marginal phase flag, kept tokens, KL) of two training steps (NSR-PreRL, then GRPO + KL);
- policy_*: the trained policy's fused log-probs, entropy and parameter gradients (of a fixed objective, through
  DeepSpeed's engine and safe_get_full_grad) against the float64 oracle on its gathered weights;
- direct_*: a model partitioned at construction, `deepspeed.initialize`d with an optimizer and patched afterwards,
  with the engine's forward pre-hook (DeepSpeed's parameter discovery) removed; one fused call of the bare module and
  a backward through the engine: the head found its weight partitioned once (direct_gathers), registered it with the
  model (direct_registered) so DeepSpeed gathered it for the backward; results against the float64 oracle;
- dtensor_*: the same head call on an FSDP2 DTensor weight sharded across the 2 ranks.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

OBJECTIVE_SEED = 123


def digit_reward(completions: list[str], **_: object) -> list[float]:
    """A reward with spread on an untrained model: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def fixed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The same (B, S) ids and attention mask on every rank (left-padded prompt, right-padded completion), and the
    completion width."""
    generator = torch.Generator().manual_seed(OBJECTIVE_SEED)
    ids = torch.randint(4, vocab, (3, 11), generator=generator)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, -3:] = 0
    return ids, mask, 6


def oracle(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, width: int,
           temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
    """float64 completion log-probs and entropy (B, width) from the full logits, called as TRL calls the model."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / temperature
    log_p = torch.log_softmax(logits, -1)
    logp = log_p.gather(-1, ids[:, 1:, None]).squeeze(-1)[:, -width:]
    entropy = -(log_p.exp() * log_p).sum(-1)[:, -width:]
    return logp, entropy


def objective(logp: torch.Tensor, entropy: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.3, logp.shape[1], dtype=logp.dtype)
    return ((logp * weights + 0.3 * entropy) * keep).sum()


def is_shard(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id") and weight.numel() == 0


class GatherCounter:
    """Counts the calls in which the fused head found its weight a ZeRO-3 shard (instrumentation of the test only)."""

    def __init__(self) -> None:
        from dsrl_fast.integrations import gathered_head

        self.count = 0
        original = gathered_head.gathered_head_weight

        def counting(weight: torch.Tensor, module: torch.nn.Module):  # type: ignore[no-untyped-def]
            self.count += int(is_shard(weight))
            return original(weight, module)

        gathered_head.gathered_head_weight = counting


def direct_zero3_check(model_dir: Path, initial: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                       width: int) -> dict[str, float]:
    """The fused head on a partitioned weight that nothing else gathers (see the module docstring): log-probs,
    entropy and full gradients against the float64 oracle (`initial`, the same weights unpartitioned)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from dsrl_fast.integrations.trl import add_dsrl_lm_head

    counter = GatherCounter()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
              "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = deepspeed.initialize(model=model, config=config, model_parameters=list(model.parameters()))[0]
    engine.module_forward_pre_hook.remove()
    add_dsrl_lm_head(engine.module, temperature=0.9, impl="torch")
    weight = engine.module.get_output_embeddings().weight
    assert is_shard(weight)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-width] = -100
    out = engine.module(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    logp, entropy = out.log_probs[:, -width:], out.entropy[:, -width:]
    keep = mask[:, -width:].bool()
    engine.backward(objective(logp, entropy, keep))
    grads = torch.cat([safe_get_full_grad(p).flatten() for p in engine.module.parameters()]).double()
    oracle_model = copy.deepcopy(initial)
    want_logp, want_entropy = oracle(oracle_model, ids, mask, width, temperature=0.9)
    objective(want_logp, want_entropy, keep).backward()
    want_grads = torch.cat([p.grad.flatten() for p in oracle_model.parameters()])
    return {"direct_gathers": float(counter.count),
            "direct_registered": float(id(weight) in getattr(engine.module, "_external_params", {})),
            "direct_logprob_err": (logp.detach().double() - want_logp.detach())[keep].abs().max().item(),
            "direct_entropy_err": (entropy.detach().double() - want_entropy.detach())[keep].abs().max().item(),
            "direct_grad_rel_err": ((grads - want_grads).norm() / want_grads.norm()).item()}


def dtensor_check(tokenizer_vocab: int) -> dict[str, float]:
    """gathered_head_logprobs on a DTensor head sharded over the ranks (FSDP2's layout) against a plain weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dsrl_fast.integrations.gathered_head import gathered_head_logprobs

    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(tokenizer_vocab, 16, generator=generator)
    hidden = torch.randn(2, 5, 16, generator=generator)
    targets = torch.randint(0, tokenizer_vocab, (2, 5), generator=generator)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    sharded = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    plain = weight.clone().requires_grad_()
    results = []
    for w in (sharded, plain):
        logp, entropy = gathered_head_logprobs(hidden, w, targets, keep, module=torch.nn.Module(), temperature=0.9,
                                               with_entropy=True, impl="torch")
        objective(logp, entropy, keep).backward()
        grad = w.grad.full_tensor() if w is sharded else w.grad
        results.append((logp.detach(), grad))
    (got_lp, got_g), (want_lp, want_g) = results
    return {"dtensor_local_rows": float(sharded.to_local().shape[0]),
            "dtensor_logprob_err": (got_lp - want_lp).abs().max().item(),
            "dtensor_grad_rel_err": ((got_g - want_g).norm() / want_g.norm()).item()}


def main() -> None:
    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    import deepspeed.ops

    # gloo carries the collectives; marking DeepSpeed's shared-memory op unavailable skips its one-time C++ build
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from datasets import Dataset
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from dsrl_fast.integrations.trl import DSRLGRPOTrainer, DSRLOptions
    from dsrl_fast.data.toy import make_addition_problems

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)  # the oracle's copy, unpartitioned
    partitioned = {"policy_at_construction": is_shard(policy.get_output_embeddings().weight)}
    args = GRPOConfig(output_dir=str(out_dir / "trainer"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=2, steps_per_generation=2, learning_rate=1e-3, beta=0.04,
                      logging_steps=1, report_to="none", save_strategy="no", seed=7, bf16=False, disable_tqdm=True,
                      ddp_backend="gloo")
    dataset = Dataset.from_list([{"prompt": p.prompt_text} for p in make_addition_problems(8, seed=1)])
    trainer = DSRLGRPOTrainer(model=policy, reward_funcs=digit_reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, dsrl=DSRLOptions(switch_step=1, impl="torch"))
    unwrap = trainer.accelerator.unwrap_model
    partitioned["ref"] = is_shard(unwrap(trainer.ref_model).get_output_embeddings().weight)
    result: dict[str, object] = {"partitioned": partitioned}

    # the reference model: TRL wrapped it in a DeepSpeed engine (partitioned) before our head was patched into it
    ids, mask, width = fixed_batch(len(tokenizer))
    keep = mask[:, -width:].bool()
    with torch.no_grad():
        ref_logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, width)
        want_logp, _ = oracle(initial, ids, mask, width)
    result["ref_logprob_err"] = (ref_logp.double() - want_logp)[keep].abs().max().item()

    # two optimizer steps: the marginal NSR-PreRL step, then GRPO with the reference model's KL
    trainer.train()
    result["log"] = [{k: h[k] for k in ("dsrl/marginal_phase", "dsrl/kept_tokens", "dsrl/kl_mean") if k in h}
                     for h in trainer.state.log_history if "dsrl/marginal_phase" in h]

    # the trained policy through DeepSpeed's engine: log-probs, entropy and every parameter's full gradient
    engine = trainer.model_wrapped
    module = unwrap(engine)
    partitioned["policy_after_training"] = is_shard(module.get_output_embeddings().weight)
    engine.train()
    logp, entropy, _ = trainer._get_per_token_logps_and_entropies(engine, ids, mask, width, compute_entropy=True)
    engine.backward(objective(logp, entropy, keep))
    grads = torch.cat([safe_get_full_grad(p).flatten() for p in module.parameters()]).double()
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        trained = copy.deepcopy(initial)
        trained.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    want_logp, want_entropy = oracle(trained, ids, mask, width)
    objective(want_logp, want_entropy, keep).backward()
    want_grads = torch.cat([p.grad.flatten() for p in trained.parameters()])
    result["policy_logprob_err"] = (logp.detach().double() - want_logp.detach())[keep].abs().max().item()
    result["policy_entropy_err"] = (entropy.detach().double() - want_entropy.detach())[keep].abs().max().item()
    result["policy_grad_rel_err"] = ((grads - want_grads).norm() / want_grads.norm()).item()
    result.update(direct_zero3_check(model_dir, initial, ids, mask, width))
    result.update(dtensor_check(len(tokenizer)))

    rank = torch.distributed.get_rank()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
