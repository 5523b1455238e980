"""Parameter updates: the policy module (packed trunk + fused loss) and its optimizer, plain PyTorch or DeepSpeed.

Loss normalization across micro-batches and ranks: every micro-batch loss is already divided by the step's *global*
denominator (kept tokens or kept sequences over all micro-batches and ranks), so gradients are summed, never
averaged: the plain updater accumulates them, and the DeepSpeed updater multiplies each loss by the world size to
undo DeepSpeed's averaging over data-parallel ranks.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.model.packed import lm_head_weight, packed_hidden_states
from dsrl_fast.data.packing import PackedBatch
from dsrl_fast.loss.policy_loss import policy_loss
from dsrl_fast.loss.token_loss import PolicyLossOutput
from dsrl_fast.interrupt import MicroBatchStops


class PolicyModule(torch.nn.Module):
    """A causal LM prepared for packed batches, whose forward is the fused policy loss of one micro-batch.

    Under DeepSpeed ZeRO-3 the LM-head weight is used outside its own module's forward, so it is registered as an
    external parameter of this module: ZeRO-3 then gathers it for the forward and the backward (tied embeddings
    included, since the tied weight is the same Parameter).
    """

    def __init__(self, model: torch.nn.Module, impl: str = "auto"):
        super().__init__()
        self.model = model
        self.impl = impl

    def register_head_for_zero3(self) -> None:
        """Declare the LM-head weight to ZeRO-3 (call before deepspeed.initialize)."""
        import deepspeed

        deepspeed.zero.register_external_parameter(self, lm_head_weight(self.model))

    def forward(self, batch: PackedBatch, advantages: torch.Tensor, config: PolicyLossConfig,
                old_logprobs: torch.Tensor | None = None,
                ref_logprobs: torch.Tensor | None = None) -> PolicyLossOutput:
        """Loss of one packed micro-batch.

        advantages, old_logprobs, ref_logprobs: (M,) fp32, one per loss-masked token in packed order.
        """
        hidden = packed_hidden_states(self.model, batch)
        labels = batch.labels.index_select(0, batch.masked_idx)
        seq_ids = batch.seq_ids.index_select(0, batch.masked_idx)
        return policy_loss(hidden, lm_head_weight(self.model), labels, advantages, old_logprobs=old_logprobs,
                           ref_logprobs=ref_logprobs, seq_ids=seq_ids, config=config, impl=self.impl)


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at `step` (0-based) for "constant", "warmup" or "cosine"."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return 1.0
    if schedule == "warmup":
        return warm
    assert schedule == "cosine", schedule
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return warm * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Updater(Protocol):
    """Runs micro-batch forwards/backwards and one optimizer step per training step.

    `stops` (None: no checks): the run's stop checks, called before each micro-batch and after each optimizer step.
    """

    module: PolicyModule
    stops: MicroBatchStops | None

    def forward_backward(self, batch: PackedBatch, advantages: torch.Tensor, config: PolicyLossConfig,
                         last: bool, **kwargs: torch.Tensor | None) -> PolicyLossOutput: ...

    def step(self, lr: float) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]: ...


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class TorchUpdater:
    """Single-process AdamW with gradient clipping and fp32 master weights for 16-bit models.

    The model computes in its own dtype. For a bf16/fp16 parameter the optimizer holds an fp32 master copy (and
    fp32 Adam states); each step updates the master and copies it back rounded to the model's dtype, so updates far
    below the 16-bit resolution (lr 1e-6 on weights ~1e-2) accumulate instead of vanishing. Gradients accumulate in
    fp32 too: a hook run after each backward has accumulated a parameter's 16-bit gradient adds it to the master's
    fp32 gradient and frees it, so a step of hundreds of micro-batches is summed without 16-bit rounding (16-bit
    sums lose the small contributions: 64 bf16 micro-batches drift several bf16 roundings from the exact sum). This
    holds 4 bytes per parameter of gradient from the first micro-batch on, instead of 2 then 4 at the step.
    fp32 parameters are their own masters. fp16 models also get dynamic loss scaling (the loss is multiplied by
    `scale` before the backward, the fp32 sum is divided by it at the step; a step whose gradients overflow is
    skipped and the scale halved).
    """

    FP16_INITIAL_SCALE = 2.0**16
    FP16_GROWTH_INTERVAL = 1000

    def __init__(self, module: PolicyModule, *, lr: float, weight_decay: float, betas: tuple[float, float],
                 eps: float, grad_clip: float):
        self.module = module
        self.stops: MicroBatchStops | None = None
        self.grad_clip = grad_clip
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.masters = [p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
                        for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        for param, master in zip(self.params, self.masters):
            if master is not param:
                param.register_post_accumulate_grad_hook(functools.partial(_add_to_master, master))
        fp16 = any(p.dtype == torch.float16 for p in self.params)
        self.scale = self.FP16_INITIAL_SCALE if fp16 else 1.0
        self._good_steps = 0

    def forward_backward(self, batch: PackedBatch, advantages: torch.Tensor, config: PolicyLossConfig, last: bool,
                         **kwargs: torch.Tensor | None) -> PolicyLossOutput:
        if self.stops is not None:
            self.stops.before_micro_batch()
        out = self.module(batch, advantages, config, **kwargs)
        (out.loss * self.scale if self.scale != 1.0 else out.loss).backward()
        return out

    def _masters_take_grads(self) -> None:
        for param, master in zip(self.params, self.masters):
            if master is not param and param.grad is not None:  # a gradient set outside a backward
                _add_to_master(master, param)
            if master.grad is not None and self.scale != 1.0:
                master.grad.div_(self.scale)

    def step(self, lr: float) -> float:
        """Clip, step, zero the gradients; returns the pre-clip gradient norm (an fp16 step whose gradients
        overflowed is skipped and returns the non-finite norm)."""
        if self.stops is not None:
            self.stops.after_optimizer_step()
        self._masters_take_grads()
        norm = torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip if self.grad_clip > 0 else float("inf"))
        if self.scale != 1.0 and not torch.isfinite(norm):
            self.scale /= 2  # fp16 overflow: skip this step with a smaller scale next time
            self._good_steps = 0
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        _set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, master in zip(self.params, self.masters):
                if master is not param:
                    param.copy_(master)
        if self.scale != 1.0:
            self._good_steps += 1
            if self._good_steps % self.FP16_GROWTH_INTERVAL == 0:
                self.scale *= 2
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        masters = [m.detach() for p, m in zip(self.params, self.masters) if m is not p]
        return {"model": self.module.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "masters": masters, "loss_scale": self.scale, "good_steps": self._good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.model.load_state_dict(state["model"])
        copies = [m for p, m in zip(self.params, self.masters) if m is not p]
        saved = state.get("masters", [])
        if len(saved) != len(copies):
            raise ValueError(f"state['masters'] must hold {len(copies)} fp32 master tensors for this model's 16-bit "
                             f"parameters, got {len(saved)} (was the checkpoint saved with another model.dtype?)")
        with torch.no_grad():
            for master, tensor in zip(copies, saved):
                master.copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scale = float(state.get("loss_scale", self.scale))
        self._good_steps = int(state.get("good_steps", 0))

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's tensors in its own dtype (what vLLM and the Hugging Face export receive)."""
        for name, tensor in self.module.model.state_dict().items():
            yield name, tensor.detach()


def _add_to_master(master: torch.nn.Parameter, param: torch.Tensor) -> None:
    """Move `param`'s 16-bit gradient into `master`'s fp32 gradient (a post-accumulate-grad hook)."""
    assert param.grad is not None
    if master.grad is None:
        master.grad = param.grad.float()
    else:
        master.grad.add_(param.grad)  # summed in fp32: the 16-bit operand is promoted exactly
    param.grad = None


def mixed_precision(dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed's precision sections for a model in `dtype`: bf16/fp16 turn on DeepSpeed's fp32 master weights,
    and gradients accumulate in fp32 across micro-batches (``data_types.grad_accum_dtype``; DeepSpeed's default is
    the model's dtype)."""
    return {"bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0, "initial_scale_power": 16},
            "data_types": {"grad_accum_dtype": "fp32"}}


def deepspeed_config(*, zero_stage: int, offload_optimizer: bool, offload_params: bool, dtype: torch.dtype,
                     lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                     grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed config dict: one micro-batch per engine call, boundaries and lr managed by the trainer.

    dtype: the model's parameter dtype; bf16/fp16 models train in DeepSpeed's mixed precision (fp32 masters,
    optimizer states and gradient accumulation, 16-bit compute), fp32 models in fp32. DeepSpeed 0.19.8 accumulates
    a 16-bit model's gradients in fp32 only under ZeRO (stage 1: its BF16_Optimizer for bf16; 2 and 3: the ZeRO
    optimizers); at stage 0 it refuses, so a 16-bit model needs zero_stage >= 1 (ValueError), which on one rank
    holds the same memory as stage 0.
    """
    if zero_stage == 0 and dtype in (torch.bfloat16, torch.float16):
        raise ValueError(f"deepspeed.zero_stage must be >= 1 for a {str(dtype).removeprefix('torch.')} model "
                         "(DeepSpeed accumulates its gradients in fp32 only under ZeRO), got 0")
    # DeepSpeed allocates its gradient buckets each micro-step: its 5e8-element default costs ~1 s per micro-step
    # on CPU, where the models are small anyway.
    bucket = 500_000_000 if torch.cuda.is_available() else 1 << 20
    zero: dict[str, Any] = {"stage": zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        **mixed_precision(dtype),
        # torch_adam avoids compiling DeepSpeed's fused/cpu Adam extensions (not needed for correctness).
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "betas": list(betas),
                                                  "eps": eps, "torch_adam": True}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedUpdater:
    """DeepSpeed ZeRO-0/1/2/3 engine (optionally CPU offload) over the policy module."""

    def __init__(self, module: PolicyModule, ds_config: dict[str, Any]):
        import deepspeed

        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # Outside a launcher DeepSpeed would look for MPI (mpi4py) and LOCAL_RANK: a plain process is a
            # one-rank group.
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        if ds_config["zero_optimization"]["stage"] == 3:
            module.register_head_for_zero3()
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=params,
                                                                 config=ds_config)
        self.module = module
        self.stops: MicroBatchStops | None = None
        self.world_size = self.engine.world_size
        self.zero_stage = ds_config["zero_optimization"]["stage"]

    def forward_backward(self, batch: PackedBatch, advantages: torch.Tensor, config: PolicyLossConfig, last: bool,
                         **kwargs: torch.Tensor | None) -> PolicyLossOutput:
        if self.stops is not None:
            self.stops.before_micro_batch()
        self.engine.set_gradient_accumulation_boundary(last)
        out = self.engine(batch, advantages, config, **kwargs)
        self.engine.backward(out.loss * self.world_size)
        return out

    def step(self, lr: float) -> float:
        """Clip and step (DeepSpeed does both); returns the global gradient norm."""
        if self.stops is not None:
            self.stops.after_optimizer_step()
        _set_lr(self.optimizer, lr)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def save_checkpoint(self, directory: str, tag: str) -> None:
        self.engine.save_checkpoint(directory, tag=tag)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full parameters one at a time (gathered under ZeRO-3), with the wrapped model's names."""
        import deepspeed

        for name, param in self.module.model.named_parameters():
            if self.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.detach().clone()
            else:
                yield name, param.detach()
