"""What a run is built from: its place in the process group, the rollout engine, the optimizer wrappers of the
policy and the critic, and a frozen reference copy."""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsrl_fast.model.saving import save_hf_model
from dsrl_fast.rl.algorithms import uses_critic
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig
from dsrl_fast.train.batch_update import CriticSetup
from dsrl_fast.train.config import TrainConfig
from dsrl_fast.train.critic import CriticModule, build_critic_model
from dsrl_fast.train.run_dir import VLLM_INIT_DIR
from dsrl_fast.train.updaters import DeepSpeedUpdater, PolicyModule, TorchUpdater, Updater, deepspeed_config


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    device: torch.device


def init_distributed() -> Dist:
    """Join the process group when launched with WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, device)


@contextlib.contextmanager
def generation_attention(model: torch.nn.Module) -> Iterator[None]:
    """Generate with SDPA (padded batches, KV cache), then return to the packed attention used for training."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class _SharedModelEngine:
    """Runs an HF engine over the training model itself with the generation attention switched in."""

    def __init__(self, engine: RolloutEngine, model: torch.nn.Module):
        self.engine, self.model = engine, model

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Any]:
        with generation_attention(self.model):
            return self.engine.generate(prompts, sampling)

    def update_weights(self, named_tensors: Any) -> None:
        """The engine shares the trainer's parameters: nothing to copy."""

    def close(self) -> None:
        self.engine.close()


def build_engine(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any,
                 should_stop: Callable[[], bool] | None = None) -> RolloutEngine:
    """The rollout engine of rollout.engine: the HF engine on the shared model, or a colocated vLLM per rank (or per
    block of rollout.tensor_parallel_size ranks).

    vLLM starts from model.name_or_path itself; the toy model, built in code, is first exported by rank 0 to
    ``<output_dir>/vllm_init`` (removed when the run ends). Every rank must call this. should_stop: asked by the HF
    engine after every generated token (a stopping run cuts its generation short); vLLM finishes each call.
    """
    if cfg.rollout.engine == "hf":
        from dsrl_fast.rollout.hf_engine import HFEngine

        return _SharedModelEngine(HFEngine(model, should_stop=should_stop), model)
    from dsrl_fast.rollout.vllm_engine import VLLMEngine

    source = cfg.model.name_or_path
    if source is None:
        export = Path(cfg.output_dir) / VLLM_INIT_DIR
        if not (dist.is_initialized() and dist.get_rank() != 0):
            save_hf_model(model, tokenizer, export)
        if dist.is_initialized():
            dist.barrier()
        source = str(export)
    # vLLM refuses a max_model_len beyond the model's positions (the toy model has 64).
    longest = cfg.data.max_prompt_len + cfg.rollout.max_response_len
    positions = getattr(model.config, "max_position_embeddings", None)
    # The trainer's dtype, not vLLM's "auto" (which runs an fp32 model in bf16 on CPU): sampler and trainer
    # log-probs must agree.
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return VLLMEngine(source, dtype=dtype, seed=cfg.seed,
                      gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                      cpu_kv_cache_gib=math.ceil(cfg.rollout.vllm_kv_cache_gib),
                      max_model_len=min(longest, positions) if positions else longest,
                      tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                      sleep_between_generations=cfg.rollout.sleep_between_generations,
                      trust_remote_code=cfg.model.trust_remote_code)


def build_updater(cfg: TrainConfig, module: PolicyModule, world_size: int) -> Updater:
    """DeepSpeed when deepspeed.enabled (None: when distributed), else single-process AdamW; both keep fp32 master
    weights for a 16-bit model."""
    o, ds = cfg.optim, cfg.deepspeed
    use_ds = ds.enabled if ds.enabled is not None else world_size > 1
    if not use_ds:
        assert world_size == 1, "check_requirements refuses deepspeed.enabled=false when distributed"
        return TorchUpdater(module, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                            grad_clip=o.grad_clip)
    dtype = next(module.parameters()).dtype
    config = deepspeed_config(zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer,
                              offload_params=ds.offload_params, dtype=dtype, lr=o.lr, weight_decay=o.weight_decay,
                              betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip)
    return DeepSpeedUpdater(module, config)


def build_critic(cfg: TrainConfig, policy: torch.nn.Module, world_size: int) -> CriticSetup | None:
    """PPO's critic (a value head on a copy of the policy, or on critic.model_path) with its own optimizer / ZeRO
    engine; None when the algorithm has no critic. Call before the policy's updater (ZeRO-3 partitions it)."""
    if not uses_critic(cfg.algo.algo, cfg.algo.after_switch):
        return None
    model = build_critic_model(policy, cfg.critic.model_path, trust_remote_code=cfg.model.trust_remote_code,
                               attention_backend=cfg.model.attention_backend)
    updater = build_updater(cfg, CriticModule(model), world_size)  # type: ignore[arg-type]
    return CriticSetup(updater, cfg.critic.lr, cfg.critic.value_clip, cfg.critic.warmup_steps)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` in eval mode with no parameter requiring a gradient (the KL reference)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
