"""vLLM's share of each GPU and its KV-cache capacity against the rollouts one step must hold.

vLLM (0.11 and later, as installed here) takes `budget = ceil(gpu_memory_utilization × total GPU memory)` and gives
its KV cache what is left of it after the weights, the peak of a profiling forward pass and, since its
VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS default, the CUDA-graph pool (vllm/v1/worker/gpu_worker.py,
determine_available_memory). Per GPU of an engine over `tp` GPUs (rollout.tensor_parallel_size):

- weights: Ψ·d / tp (Ψ parameters, d bytes each; the trainer's dtype, which the engine is given).
- profiling peak (estimate): one forward over max_num_batched_tokens tokens T_b holds about T_b·(3·I/tp + 4·H)
  activations of d bytes (the MLP's gate/up output and its product, the residual stream), and the sampler's dummy
  run over max_num_seqs rows S about 3·S·V fp32 values (logits, probabilities, log-probabilities). vLLM's defaults:
  T_b = 16384, S = 1024 on GPUs of 70 GiB or more (A100s excepted), 8192 and 256 below.
- CUDA-graph pool and communication buffers: `VllmReserves` (guesses, printed as such). Level-1 sleep
  (rollout.sleep_between_generations) moves the weights to the CPU and frees the KV cache but keeps both on the GPU.
- KV cache: the rest, in blocks of BLOCK_SIZE tokens of 2·L·max(1, K/tp)·D·d bytes each (L layers, K key/value
  heads, head dimension D, the model dtype: vLLM's kv_cache_dtype "auto").

A step's rollouts per engine: prompts_per_step / ranks × tp prompts × rollout.n samples. When more of them than the
KV cache holds at full length (data.max_prompt_len + rollout.max_response_len) run long, vLLM preempts and later
recomputes them: the rollout is preemption-bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 1 << 30
BLOCK_SIZE = 16
# vLLM's offline (LLM class) scheduler defaults by GPU memory (vllm/engine/arg_utils.py).
LARGE_GPU = 70 * GIB
LARGE_GPU_BATCHED_TOKENS, LARGE_GPU_MAX_SEQS = 16384, 1024
SMALL_GPU_BATCHED_TOKENS, SMALL_GPU_MAX_SEQS = 8192, 256


@dataclass(frozen=True)
class VllmReserves:
    """What a vLLM engine keeps on each GPU beside its weights, activations and KV cache, in bytes.

    Both are guesses, not measurements: no script of this project measures them (bench/gpu_run.py measures the
    trainer's update step only). vLLM prints the first at start-up ("Graph capturing finished in ... took X GiB").

    cuda_graphs: the CUDA-graph pool of the captured decode batch sizes (none with enforce_eager, which the
        trainer sets only on CPU); kept through level-1 sleep.
    comm_buffers_tp: NCCL and custom all-reduce buffers of an engine over more than one GPU (none at
        tensor_parallel_size 1); kept through level-1 sleep.
    """

    cuda_graphs: int = GIB
    comm_buffers_tp: int = GIB // 2

    def __post_init__(self) -> None:
        for name in ("cuda_graphs", "comm_buffers_tp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (bytes), got {value!r}")


@dataclass(frozen=True)
class VllmShare:
    """vLLM's bytes per GPU and what its KV cache holds.

    budget: gpu_memory_utilization × GPU memory. weights, activations, cuda_graphs, comm_buffers, kv_cache: its
    parts (kv_cache is the rest, negative when the others exceed the budget: vLLM then refuses to start).
    kv_bytes_per_token: per GPU. kv_tokens: tokens the engine's KV cache holds (whole blocks).
    sequence_len: data.max_prompt_len + rollout.max_response_len. full_sequences: sequences of that length the
    KV cache holds at once. rollouts: sequences the engine generates per step. max_num_seqs: vLLM's cap on
    sequences running at once. tensor_parallel: GPUs per engine.
    """

    budget: int
    weights: int
    activations: int
    cuda_graphs: int
    comm_buffers: int
    kv_cache: int
    kv_bytes_per_token: int
    kv_tokens: int
    sequence_len: int
    full_sequences: int
    rollouts: int
    max_num_seqs: int
    tensor_parallel: int
    utilization: float

    @property
    def starts(self) -> bool:
        """True when the KV cache holds at least one full-length sequence (vLLM refuses to start otherwise)."""
        return self.full_sequences >= 1

    @property
    def preemption_bound(self) -> bool:
        """True when a step's rollouts, all at full length, exceed what the KV cache holds at once."""
        return self.full_sequences < min(self.rollouts, self.max_num_seqs)


def kv_bytes_per_token(config: Any, bytes_per_value: int, tensor_parallel: int) -> int:
    """KV-cache bytes one token takes on each GPU: 2 (K and V) · layers · max(1, kv heads / tp) · head dim · d."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * max(1, kv_heads // tensor_parallel) * head_dim * bytes_per_value


def vllm_share(cfg: Any, config: Any, *, params: int, bytes_per_value: int, gpus: int, gpu_memory: int,
               reserves: VllmReserves) -> VllmShare:
    """vLLM's share of each of `gpus` GPUs of `gpu_memory` bytes for TrainConfig `cfg` with rollout.engine "vllm".

    config: the model's transformers config. params: its parameters Ψ. bytes_per_value: d, the model dtype's size.
    """
    tp = cfg.rollout.tensor_parallel_size
    utilization = cfg.rollout.gpu_memory_utilization
    budget = math.ceil(utilization * gpu_memory)
    large = gpu_memory >= LARGE_GPU
    batched = LARGE_GPU_BATCHED_TOKENS if large else SMALL_GPU_BATCHED_TOKENS
    max_seqs = LARGE_GPU_MAX_SEQS if large else SMALL_GPU_MAX_SEQS
    weights = params * bytes_per_value // tp
    intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
    activations = (batched * (3 * intermediate // tp + 4 * config.hidden_size) * bytes_per_value
                   + 3 * max_seqs * config.vocab_size * 4)
    comm = reserves.comm_buffers_tp if tp > 1 else 0
    kv_cache = budget - weights - activations - reserves.cuda_graphs - comm
    per_token = kv_bytes_per_token(config, bytes_per_value, tp)
    blocks = max(0, kv_cache) // (BLOCK_SIZE * per_token)
    sequence_len = cfg.data.max_prompt_len + cfg.rollout.max_response_len
    return VllmShare(
        budget=budget, weights=weights, activations=activations, cuda_graphs=reserves.cuda_graphs,
        comm_buffers=comm, kv_cache=kv_cache, kv_bytes_per_token=per_token, kv_tokens=blocks * BLOCK_SIZE,
        sequence_len=sequence_len, full_sequences=blocks // math.ceil(sequence_len / BLOCK_SIZE),
        rollouts=cfg.prompts_per_step // gpus * tp * cfg.rollout.n, max_num_seqs=max_seqs, tensor_parallel=tp,
        utilization=utilization,
    )
