"""Rollouts with ``transformers``' ``generate``: the CPU / no-vLLM engine.

Log-probs follow the contract of :mod:`dsrl_fast.rollout.base`: ``log_softmax(logits / T)`` of
each sampled token over the full vocabulary, also when ``top_p < 1`` (the nucleus only decides
what can be sampled). They are read from the model's raw logits by a logits processor that runs
before the temperature and top-p warpers, keeping one ``(rows, V)`` buffer instead of
``generate``'s per-step logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from dsrl_fast.rollout.base import Rollout, SamplingConfig, check_prompts

__all__ = ["HFEngine"]


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


class _SampledLogProbs:
    """Logits processor recording ``log_softmax(raw_logits / T)`` of each step's sampled token.

    A step's token is only known at the next call (as the last input id) or from the final
    sequences, so the previous step's log-softmax row is kept until then.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def collect(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """new_tokens: (R, T) int64 generated ids -> (R, T) fp32 log-probs."""
        if new_tokens.shape[1] > len(self.steps):
            assert self.previous is not None and new_tokens.shape[1] == len(self.steps) + 1
            self.steps.append(self.previous.gather(1, new_tokens[:, -1:]).squeeze(1))
        self.previous = None
        return torch.stack(self.steps, dim=1)


class _AskToStop:
    """A stopping criterion ending every row when ``should_stop()`` turns True (checked once per token)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        del scores, kwargs
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)


class HFEngine:
    """Samples from a ``transformers`` causal LM with ``model.generate``.

    Args:
        model: the causal LM. Pass the trainer's own model object to share its parameters
            (``update_weights`` is then free); a separate copy is kept in sync by copying.
        pad_token_id: id used for left padding; defaults to the model's pad, then EOS, then 0.
        should_stop: asked after every generated token; when it returns True the call ends there, its
            responses cut short (``finished=False``): a run that is stopping does not wait for a long
            generation it will throw away.

    Generation stops at ``sampling.stop_token_ids`` and the model's EOS (its generation config).
    Runs under ``torch.no_grad`` in eval mode; the model's training mode is restored afterwards.
    With ``sampling.seed`` set the result is reproducible and the global RNG is left untouched.
    """

    def __init__(self, model: Any, *, pad_token_id: int | None = None,
                 should_stop: Callable[[], bool] | None = None):
        if not hasattr(model, "generate"):
            raise TypeError(f"model must be a transformers generation model, got {type(model).__name__}")
        if should_stop is not None and not callable(should_stop):
            raise TypeError(f"should_stop must be callable or None, got {type(should_stop).__name__}")
        self.model = model
        self.should_stop = should_stop
        self.eos_token_ids = _token_ids(getattr(model.generation_config, "eos_token_id", None))
        if pad_token_id is None:
            pad_token_id = model.generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = getattr(model.config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(pad_token_id)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """``sampling.n`` rollouts per prompt, grouped by prompt in order (see the module contract)."""
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            StoppingCriteriaList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        check_prompts(prompts, sampling)
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        rows = [ids for ids in prompts for _ in range(sampling.n)]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        stop_ids = list(dict.fromkeys([*sampling.stop_token_ids, *self.eos_token_ids]))
        # Built-in warpers stay off (T=1, top_p=1, top_k=0; unset values would come from the model's generation
        # config) so the recorder sees raw logits; ours follow it.
        config = GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=1.0,
            top_p=1.0,
            top_k=None if sampling.greedy else 0,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stop_ids or None,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
        )
        recorder = _SampledLogProbs(1.0 if sampling.greedy else sampling.temperature)
        processors: list[Any] = [recorder]
        if not sampling.greedy and sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if not sampling.greedy and sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        rng_devices = [device] if device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices, enabled=sampling.seed is not None):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                out = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList(processors),
                    stopping_criteria=StoppingCriteriaList([_AskToStop(self.should_stop)] if self.should_stop else []),
                )
                new_tokens = out.sequences[:, width:]
                logprobs = recorder.collect(new_tokens)
        finally:
            self.model.train(was_training)
        return self._rollouts(new_tokens.tolist(), logprobs.tolist(), set(stop_ids), sampling.n)

    @staticmethod
    def _rollouts(tokens: list[list[int]], logprobs: list[list[float]], stop_ids: set[int], n: int) -> list[Rollout]:
        rollouts = []
        for row, (ids, lps) in enumerate(zip(tokens, logprobs)):
            end = next((t + 1 for t, token in enumerate(ids) if token in stop_ids), None)
            finished = end is not None
            end = len(ids) if end is None else end
            rollouts.append(Rollout(row // n, ids[:end], lps[:end], finished))
        return rollouts

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``named_tensors`` (state-dict names) into the model; tensors that already are the
        model's own storage are skipped, so syncing the trainer's shared model costs nothing."""
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise ValueError(f"named_tensors: {name!r} is not a parameter or buffer of the model")
                target = state[name]
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"named_tensors: {name!r} must have shape {tuple(target.shape)}, got {tuple(tensor.shape)}"
                    )
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""
