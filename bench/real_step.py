"""One real-shape update step on a GPU, measured against the memory plan (for bench/gpu_run.py).

The Qwen3-4B architecture with random weights (nothing downloaded), one process without DeepSpeed (the plain
fp32-master AdamW updater), gradient checkpointing, the fused policy loss: `dsrl-fast plan`'s estimate for this
GPU gives the largest packed micro-batch that fits; that micro-batch (random token ids packed into sequences of a
1,024-token prompt and an 8,192-token response) runs forward + backward and one optimizer step. Recorded: the
plan's lines per phase against the peak memory measured in the same phases (weights and optimizer state, the
micro-batch, the step), and update tokens/s. Where the plan says the model does not fit this GPU (the 4B
architecture's fp32 masters, AdamW states and step transient need ~90 GiB: an H200, not an H100), the plan is
recorded and the step is not run.

Written against the package layout of commit ff3d465 (dsrl_fast.planning, dsrl_fast.train.config,
dsrl_fast.train.updaters, dsrl_fast.data.packing, dsrl_fast.model.packed); the package reorganisation may move these imports.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PROMPT_LEN = 1024
RESPONSE_LEN = 8192
GIB = 1 << 30


def _plan(model_name: str | None, gpu_memory: int) -> Any:
    from dsrl_fast.planning import plan_memory
    from dsrl_fast.train.config import DataConfig, DeepSpeedConfig, ModelConfig, RolloutConfig, TrainConfig

    # A named model needs a data path to be a valid run config; the plan never reads it.
    data = DataConfig(train_path=None if model_name is None else "TRAIN.jsonl")
    cfg = TrainConfig(model=ModelConfig(name_or_path=model_name, dtype="bfloat16", gradient_checkpointing=True),
                      data=data, rollout=RolloutConfig(engine="hf"), deepspeed=DeepSpeedConfig(enabled=False))
    return plan_memory(cfg, gpus=1, gpu_memory=gpu_memory)


def _phase_bytes(plan: Any) -> dict[str, int]:
    totals: dict[str, int] = {}
    for item in plan.items:
        totals[item.phase] = totals.get(item.phase, 0) + item.nbytes
    return totals


def _batch(tokens: int, vocab: int, device: torch.device, seed: int) -> tuple[Any, torch.Tensor, int]:
    """One packed micro-batch of at most `tokens` tokens: (PackedBatch, advantages per scored token, tokens)."""
    from dsrl_fast.data.packing import build_micro_batches

    gen = torch.Generator().manual_seed(seed)
    per_seq = PROMPT_LEN + RESPONSE_LEN
    seqs = max(1, tokens // per_seq)
    response = min(RESPONSE_LEN, tokens - PROMPT_LEN) if seqs == 1 else RESPONSE_LEN
    prompts = [torch.randint(0, vocab, (PROMPT_LEN,), generator=gen).tolist() for _ in range(seqs)]
    responses = [torch.randint(0, vocab, (response,), generator=gen).tolist() for _ in range(seqs)]
    (idx, batch), = build_micro_batches(prompts, responses, "cond", tokens)
    batch = batch.to(device)
    signs = [1.0 if i % 2 == 0 else -1.0 for i in range(seqs)]
    advantages = torch.tensor([signs[idx[s]] for s in batch.seq_sample_host]).repeat_interleave(
        torch.tensor(batch.seq_response_lens)).to(device)
    return batch, advantages, seqs * (PROMPT_LEN + response)


def update_step(model_name: str | None, device: torch.device, gpu_memory: int | None = None,
                max_tokens: int | None = None) -> dict[str, Any]:
    """Plan, then (if it fits) one update step of `model_name` (a shipped id, None: the embedded toy) on `device`.

    gpu_memory: the budget the plan uses (default: the device's total memory). max_tokens: cap on the micro-batch
    (default: the plan's largest). Returns the plan per phase, the measured peaks per phase, tokens and tokens/s.
    """
    from dsrl_fast import PolicyLossConfig
    from dsrl_fast.model.packed import prepare_packed_model
    from dsrl_fast.planning.shapes import model_config
    from dsrl_fast.train.updaters import PolicyModule, TorchUpdater

    cuda = device.type == "cuda"
    if gpu_memory is None:
        gpu_memory = torch.cuda.get_device_properties(device).total_memory if cuda else 24 * GIB
    plan = _plan(model_name, gpu_memory)
    result: dict[str, Any] = {"model": plan.model, "parameters": plan.parameters, "gpu_memory": gpu_memory,
                              "plan_update_peak": plan.update_peak, "plan_max_tokens": plan.max_tokens,
                              "plan_phases": _phase_bytes(plan),
                              "plan_items": [[i.name, i.nbytes, i.phase] for i in plan.items]}
    if plan.max_tokens is None or plan.update_peak > gpu_memory:
        result["skipped"] = (f"the plan does not fit: update peak {plan.update_peak / GIB:.1f} GiB > "
                             f"{gpu_memory / GIB:.1f} GiB of this GPU")
        return result
    tokens = min(plan.max_tokens, max_tokens or plan.max_tokens)
    if tokens < PROMPT_LEN + 1:
        result["skipped"] = f"the planned micro-batch ({tokens} tokens) is shorter than one prompt"
        return result

    def allocated() -> int:
        return torch.cuda.memory_allocated(device) if cuda else 0

    def peak() -> int:
        return torch.cuda.max_memory_allocated(device) if cuda else 0

    from transformers import AutoModelForCausalLM

    config = model_config(model_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prepare_packed_model(model.train())
    updater = TorchUpdater(PolicyModule(model), lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                           grad_clip=1.0)
    state = allocated()
    batch, advantages, real_tokens = _batch(tokens, config.vocab_size, device, seed=0)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = updater.forward_backward(batch, advantages, PolicyLossConfig(), last=True)
    if cuda:
        torch.cuda.synchronize(device)
    micro_peak, backward_done = peak(), time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    norm = updater.step(1e-6)
    if cuda:
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    result.update({
        "tokens": real_tokens, "scored_tokens": int(advantages.numel()), "loss": float(out.loss.detach()),
        "grad_norm": norm, "forward_backward_s": backward_done - start, "step_s": end - backward_done,
        "tokens_per_s": real_tokens / (end - start),
        "measured": {"weights+masters": state, "micro-batch peak": micro_peak, "optimizer step peak": peak(),
                     "after step": allocated()} if cuda else None,
    })
    return result
