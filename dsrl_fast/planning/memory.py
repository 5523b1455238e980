"""Per-GPU memory of a training run, before launching it: `plan_memory(cfg, gpus=..., gpu_memory=...)`.

Notation: Ψ trainable parameters (counted on the real architecture built on the meta device), d bytes per parameter
in the model dtype, n GPUs (data-parallel ranks). What the model charges per GPU:

- weights Ψ·d (ZeRO-3: Ψ·d/n, plus the gathered working set: DeepSpeed's default stage3_max_live_parameters of 1e9
  elements plus the LM head, at most Ψ; with offload_params only the working set).
- fp32 master weights 4Ψ for 16-bit models (DeepSpeed's mixed precision and the plain updater alike) and AdamW's
  fp32 m and v, 8Ψ; both divided by n from ZeRO-1 on, and on the CPU with offload_optimizer.
- gradients in the model dtype, Ψ·d (ZeRO-2/3: Ψ·d/n; on the CPU with offload_optimizer from ZeRO-2 on), held from
  the first micro-batch to the optimizer step; DeepSpeed adds its reduce bucket (5e8 elements on CUDA, as
  dsrl_fast.train.updaters.deepspeed_config sets it).
- one micro-batch: the trunk's activations and the fused loss's workspace, from a meta-device run of the real model
  (dsrl_fast.planning.simulate) with every packed token scored (the marginal phase's worst case).
- the optimizer step, after the activations are freed: an fp32 copy of the gradient shard for the masters (16-bit
  models; the plain updater frees each 16-bit gradient as it casts it) and the square-root temporary of
  multi-tensor AdamW, 4Ψ each, divided like the optimizer states (none on the GPU with offload_optimizer).
- a frozen KL reference copy Ψ·d when algo.kl_coef > 0.
- vLLM's share with rollout.engine "vllm" (dsrl_fast.planning.vllm): rollout.gpu_memory_utilization × the GPU
  memory, split into weights, profiling peak, CUDA-graph pool, communication buffers and KV cache; held through the
  update unless vLLM sleeps during it (rollout.sleep_between_generations), when only the CUDA-graph pool and the
  communication buffers stay.
- a runtime reserve for the trainer's CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation
  (DEFAULT_RESERVE: a guess, not a measurement).

The peak per GPU is the larger of the update phase (everything above but a sleeping vLLM) and the rollout phase
(weights, masters, optimizer states, reference, vLLM, reserve).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from dsrl_fast.planning.shapes import model_config
from dsrl_fast.planning.simulate import LossWorkspace, micro_batch_peak
from dsrl_fast.planning.units import GIB
from dsrl_fast.planning.vllm import VllmReserves, VllmShare, vllm_share
from dsrl_fast.train.config import TrainConfig
from dsrl_fast.model.dtypes import model_dtype

DEFAULT_RESERVE = 2 * GIB
DS_BUCKET_ELEMENTS = 500_000_000
ZERO3_MAX_LIVE_ELEMENTS = 1_000_000_000
TOKEN_GRANULE = 256

ALWAYS, ROLLOUT, UPDATE, MICRO_BATCH, STEP = "always", "rollout", "update", "micro-batch", "step"
PHASES = (ALWAYS, ROLLOUT, UPDATE, MICRO_BATCH, STEP)


@dataclass(frozen=True)
class MemoryItem:
    """One line of the plan: `nbytes` per GPU, held during `phase` (one of PHASES); `note` explains it."""

    name: str
    nbytes: int
    phase: str
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for one config on `gpus` GPUs of `gpu_memory` bytes each (all sizes in bytes per GPU).

    items: the lines of the table. activations_other: the activations with gradient checkpointing switched the
    other way. update_peak / rollout_peak: the two phases' totals. max_tokens: the largest
    optim.max_tokens_per_micro_batch (a multiple of TOKEN_GRANULE) whose update phase fits, None if none does.
    longest_sequence: data.max_prompt_len + rollout.max_response_len (the smallest valid token budget).
    gpu_memory_source: where gpu_memory comes from (the command line, the CUDA device, the default).
    vllm: vLLM's share and KV-cache capacity (rollout.engine "vllm"), else None.
    """

    model: str
    parameters: int
    dtype: str
    gpus: int
    gpu_memory: int
    updater: str
    tokens: int
    gradient_checkpointing: bool
    loss_kind: str
    items: tuple[MemoryItem, ...]
    activations_other: int
    update_peak: int
    rollout_peak: int
    max_tokens: int | None
    longest_sequence: int
    gpu_memory_source: str = "given"
    vllm: VllmShare | None = None

    @property
    def peak(self) -> int:
        """Peak bytes per GPU over both phases."""
        return max(self.update_peak, self.rollout_peak)

    @property
    def fits(self) -> bool:
        """True when the peak fits the GPU memory and vLLM's KV cache holds at least one full-length sequence."""
        return self.peak <= self.gpu_memory and (self.vllm is None or self.vllm.starts)


@dataclass(frozen=True)
class _Setup:
    """What the estimate needs from the config and the command line."""

    config: Any
    dtype: torch.dtype
    params: int
    vocab: int
    hidden: int
    gpus: int
    use_deepspeed: bool
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    masters: bool


def count_parameters(config: Any) -> int:
    """Trainable parameters of the causal LM of transformers config `config`, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@functools.lru_cache(maxsize=8)
def _count_cached(config_json: str) -> int:
    """count_parameters once per model config (its JSON text)."""
    return count_parameters(_config_from_json(config_json))


def _config_from_json(config_json: str) -> Any:
    from transformers import AutoConfig

    config_dict = json.loads(config_json)
    return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _setup(cfg: TrainConfig, gpus: int) -> _Setup:
    ds = cfg.deepspeed
    use_ds = ds.enabled if ds.enabled is not None else gpus > 1
    if not use_ds and gpus > 1:
        raise ValueError(f"deepspeed.enabled must be true or null with {gpus} GPUs (data-parallel training runs "
                         "through DeepSpeed), got false")
    dtype = model_dtype(cfg.model.dtype, torch.device("cuda"))  # a plan is for GPUs: "auto" is bfloat16
    config = model_config(cfg.model.name_or_path)
    return _Setup(
        config=config, dtype=dtype, params=_count_cached(config.to_json_string()), vocab=config.vocab_size,
        hidden=config.hidden_size, gpus=gpus, use_deepspeed=use_ds, zero_stage=ds.zero_stage if use_ds else 0,
        offload_optimizer=use_ds and ds.offload_optimizer, offload_params=use_ds and ds.offload_params,
        masters=dtype.itemsize < 4,
    )


def _updater_name(s: _Setup) -> str:
    if not s.use_deepspeed:
        return "plain AdamW (one process)"
    offload = [what for what, on in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if on]
    return f"DeepSpeed ZeRO-{s.zero_stage}" + (f", {' + '.join(offload)} offloaded to CPU" if offload else "")


def _state_items(s: _Setup, cfg: TrainConfig, vllm: VllmShare | None, vllm_sleep: bool,
                 reserve: int) -> list[MemoryItem]:
    """Every line but the micro-batch's (weights, masters, optimizer, gradients, step, reference, vLLM, reserve)."""
    psi, d, n = s.params, s.dtype.itemsize, s.gpus
    dtype_name = str(s.dtype).removeprefix("torch.")
    shard_opt = n if s.zero_stage >= 1 else 1
    shard_grad = n if s.zero_stage >= 2 else 1
    shard_param = n if s.zero_stage == 3 else 1
    on_cpu = "on the CPU (offload_optimizer)"
    items = [MemoryItem(f"weights ({dtype_name})", 0 if s.offload_params else psi * d // shard_param, ALWAYS,
                        "on the CPU (offload_params)" if s.offload_params
                        else (f"ZeRO-3 shard 1/{n}" if shard_param > 1 else ""))]
    if s.zero_stage == 3:
        live = min(psi, ZERO3_MAX_LIVE_ELEMENTS + s.vocab * s.hidden)
        items.append(MemoryItem("ZeRO-3 gathered parameters", live * d, UPDATE,
                                "stage3_max_live_parameters 1e9 + LM head"))
    masters = 4 * psi // shard_opt if s.masters else 0
    items.append(MemoryItem("fp32 master weights", 0 if s.offload_optimizer else masters, ALWAYS,
                            on_cpu if s.offload_optimizer and masters else
                            ("none: fp32 model" if not s.masters else (f"ZeRO shard 1/{n}" if shard_opt > 1 else ""))))
    items.append(MemoryItem("optimizer states (AdamW m, v fp32)", 0 if s.offload_optimizer else 8 * psi // shard_opt,
                            ALWAYS, on_cpu if s.offload_optimizer else
                            (f"ZeRO shard 1/{n}" if shard_opt > 1 else "")))
    grads_on_cpu = s.offload_optimizer and s.zero_stage >= 2
    items.append(MemoryItem(f"gradients ({dtype_name})", 0 if grads_on_cpu else psi * d // shard_grad, UPDATE,
                            on_cpu if grads_on_cpu else (f"ZeRO shard 1/{n}" if shard_grad > 1 else "")))
    if s.use_deepspeed:
        items.append(MemoryItem("DeepSpeed reduce bucket", min(DS_BUCKET_ELEMENTS, psi) * d, UPDATE,
                                "reduce_bucket_size 5e8 elements"))
    step = 0 if s.offload_optimizer else (8 if s.masters else 4) * psi // shard_opt
    if s.masters and not s.use_deepspeed:
        step -= psi * d  # the plain updater frees each 16-bit gradient as it casts it for the master
    items.append(MemoryItem("optimizer step (transient)", step, STEP,
                            "on the CPU" if s.offload_optimizer else
                            ("fp32 gradient copy + AdamW sqrt temporary" if s.masters else "AdamW sqrt temporary")))
    if cfg.algo.kl_coef > 0:
        items.append(MemoryItem("KL reference model", psi * d, ALWAYS, "algo.kl_coef > 0"))
    if vllm is not None:
        items += _vllm_items(vllm, dtype_name, vllm_sleep)
    else:
        items.append(MemoryItem("vLLM", 0, ROLLOUT, "rollout.engine hf: generation cache not modelled"))
    items.append(MemoryItem("runtime reserve (guess)", reserve, ALWAYS,
                            "trainer's CUDA context, cuBLAS/NCCL workspaces, fragmentation; not measured (--reserve)"))
    return items


def _vllm_items(v: VllmShare, dtype_name: str, asleep: bool) -> list[MemoryItem]:
    """vLLM's lines: what level-1 sleep frees (weights, KV cache, profiling peak) and what it keeps."""
    freed = ROLLOUT if asleep else ALWAYS
    tp = f"1/{v.tensor_parallel} (tensor_parallel_size)" if v.tensor_parallel > 1 else ""
    sleep = "; on the CPU while asleep" if asleep else ""
    return [
        MemoryItem(f"vLLM weights ({dtype_name})", v.weights, freed, (tp + sleep).lstrip("; ")),
        MemoryItem("vLLM profiling peak (estimate)", v.activations, freed, "forward over max_num_batched_tokens + "
                   "sampler over max_num_seqs"),
        MemoryItem("vLLM CUDA-graph pool (guess)", v.cuda_graphs, ALWAYS,
                   "kept through level-1 sleep; not measured (--cuda-graph-memory)"),
        MemoryItem("vLLM communication buffers (guess)", v.comm_buffers, ALWAYS,
                   "NCCL/all-reduce of a TP engine, kept through sleep (--comm-buffers)" if v.tensor_parallel > 1
                   else "none at tensor_parallel_size 1"),
        MemoryItem("vLLM KV cache", max(0, v.kv_cache), freed,
                   f"the rest of gpu_memory_utilization {v.utilization:g} x GPU = {v.budget / GIB:.2f} GiB"
                   + ("; freed while asleep" if asleep else "")),
    ]


def _sum(items: list[MemoryItem], *phases: str) -> int:
    return sum(i.nbytes for i in items if i.phase in phases)


def _micro(s: _Setup, tokens: int, checkpointing: bool, workspace: LossWorkspace | None) -> int:
    return _micro_cached(s.config.to_json_string(), s.dtype, tokens, checkpointing, workspace)


@functools.lru_cache(maxsize=256)
def _micro_cached(config_json: str, dtype: torch.dtype, tokens: int, checkpointing: bool,
                  workspace: LossWorkspace | None) -> int:
    """micro_batch_peak once per model config (its JSON text) and micro-batch: re-plans for the fixes repeat them."""
    return micro_batch_peak(_config_from_json(config_json), dtype=dtype, tokens=tokens, scored=tokens, gradient_checkpointing=checkpointing,
                            workspace=workspace)


def _max_tokens(s: _Setup, budget: int, checkpointing: bool, workspace: LossWorkspace, at: int,
                peak_at: int) -> int | None:
    """Largest multiple of TOKEN_GRANULE whose micro-batch peak is <= budget (the peak is affine in the tokens)."""
    other = at // 2 if at >= 2 * TOKEN_GRANULE else 2 * at
    peak_other = _micro(s, other, checkpointing, workspace)
    slope = (peak_at - peak_other) / (at - other)
    if slope <= 0:
        return None
    intercept = peak_at - slope * at
    tokens = math.floor((budget - intercept) / slope / TOKEN_GRANULE) * TOKEN_GRANULE
    while tokens >= TOKEN_GRANULE:
        excess = _micro(s, tokens, checkpointing, workspace) - budget
        if excess <= 0:
            return tokens
        tokens -= max(1, math.ceil(excess / slope / TOKEN_GRANULE)) * TOKEN_GRANULE
    return None


def plan_memory(cfg: TrainConfig, *, gpus: int, gpu_memory: int, workspace: LossWorkspace = LossWorkspace(),
                vllm_sleep: bool | None = None, reserve: int = DEFAULT_RESERVE,
                vllm_reserves: VllmReserves = VllmReserves(), gpu_memory_source: str = "given") -> MemoryPlan:
    """Estimate the per-GPU memory of training `cfg` on `gpus` GPUs with `gpu_memory` bytes each.

    workspace: memory model of the fused loss (default: the Triton no-logits op). vllm_sleep: vLLM releases its memory
    (level-1 sleep) during the update; None reads rollout.sleep_between_generations. reserve: bytes set aside for
    the trainer's CUDA context, workspaces and fragmentation. vllm_reserves: vLLM's CUDA-graph pool and
    communication buffers. gpu_memory_source: where gpu_memory comes from, printed with it.
    Raises ValueError/TypeError naming the argument (or the config key) on bad input.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    _check_int("gpus", gpus, 1)
    _check_int("gpu_memory", gpu_memory, 1)
    _check_int("reserve", reserve, 0)
    if not isinstance(workspace, LossWorkspace):
        raise TypeError(f"workspace must be a LossWorkspace, got {type(workspace).__name__}")
    if not isinstance(vllm_reserves, VllmReserves):
        raise TypeError(f"vllm_reserves must be a VllmReserves, got {type(vllm_reserves).__name__}")
    # The launches `dsrl-fast train` refuses (dsrl_fast.train.setup.check_requirements) have no plan either.
    if cfg.prompts_per_step % gpus:
        raise ValueError(f"prompts_per_step must be a multiple of gpus={gpus} (each rank samples an equal share), "
                         f"got {cfg.prompts_per_step}")
    if cfg.rollout.engine == "vllm" and gpus % cfg.rollout.tensor_parallel_size:
        raise ValueError(f"rollout.tensor_parallel_size must divide gpus={gpus}, got "
                         f"{cfg.rollout.tensor_parallel_size}")
    s = _setup(cfg, gpus)
    if vllm_sleep is None:
        vllm_sleep = cfg.rollout.sleep_between_generations
    vllm = None if cfg.rollout.engine != "vllm" else vllm_share(
        cfg, s.config, params=s.params, bytes_per_value=s.dtype.itemsize, gpus=gpus, gpu_memory=gpu_memory,
        reserves=vllm_reserves)
    tokens = cfg.optim.max_tokens_per_micro_batch
    checkpointing = cfg.model.gradient_checkpointing
    activations = _micro(s, tokens, checkpointing, None)
    micro = _micro(s, tokens, checkpointing, workspace)
    items = _state_items(s, cfg, vllm, vllm_sleep, reserve)
    at = next(k for k, item in enumerate(items) if item.phase == STEP)
    items[at:at] = [MemoryItem(f"activations (checkpointing {'on' if checkpointing else 'off'})", activations,
                               MICRO_BATCH, f"{tokens:,} packed tokens"),
                    MemoryItem(f"fused-loss workspace ({workspace.kind})", micro - activations, MICRO_BATCH,
                               "peak increase over a free loss")]
    fixed = _sum(items, ALWAYS, UPDATE)
    update_peak = fixed + max(micro, _sum(items, STEP))
    rollout_peak = _sum(items, ALWAYS, ROLLOUT)
    max_tokens = None
    if fixed + _sum(items, STEP) <= gpu_memory:
        max_tokens = _max_tokens(s, gpu_memory - fixed, checkpointing, workspace, tokens, micro)
    return MemoryPlan(
        model=cfg.model.name_or_path or "embedded toy Qwen3", parameters=s.params,
        dtype=str(s.dtype).removeprefix("torch."), gpus=gpus, gpu_memory=gpu_memory, updater=_updater_name(s),
        tokens=tokens, gradient_checkpointing=checkpointing, loss_kind=workspace.kind, items=tuple(items),
        activations_other=_micro(s, tokens, not checkpointing, None), update_peak=update_peak,
        rollout_peak=rollout_peak, max_tokens=max_tokens,
        longest_sequence=cfg.data.max_prompt_len + cfg.rollout.max_response_len,
        gpu_memory_source=gpu_memory_source, vllm=vllm,
    )
