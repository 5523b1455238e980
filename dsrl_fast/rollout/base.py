"""The rollout contract: sampling options, one sampled response, and the engine protocol.

Conventions shared by every engine:

- ``generate`` returns ``n`` rollouts per prompt, grouped by prompt in order: prompt 0's ``n``,
  then prompt 1's ``n``, ...
- A response ends at the first stop token (``stop_token_ids`` or the model's EOS), and that token
  **is kept** in ``response_ids``: the trainer must score it so the policy learns to stop.
  A response cut by ``max_new_tokens`` has ``finished=False``.
- ``logprobs[t]`` is the sampler's log-probability of ``response_ids[t]`` at the sampling
  temperature over the full vocabulary, ``log_softmax(logits / T)``: the quantity the trainer
  recomputes with ``temperature=T``. ``temperature=0`` means greedy decoding; its log-probs are
  then ``log_softmax(logits)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Rollout", "RolloutEngine", "SamplingConfig", "check_prompts"]


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled.

    Attributes:
        temperature: logits are divided by it before sampling; 0 selects greedy decoding.
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        n: responses sampled per prompt.
        max_new_tokens: length cap of a response (a capped response has ``finished=False``).
        stop_token_ids: tokens that end a response in addition to the model's EOS; kept in the response.
        seed: makes a ``generate`` call reproducible; None draws from the engine's running RNG state.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        for name in ("n", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        stop = self.stop_token_ids
        if not isinstance(stop, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop
        ):
            raise TypeError(f"stop_token_ids must be a tuple of non-negative ints, got {stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when ``temperature == 0``."""
        return self.temperature == 0


@dataclass
class Rollout:
    """One sampled response.

    Attributes:
        prompt_index: index of its prompt in the ``generate`` call.
        response_ids: sampled token ids, the stop token included when one was hit.
        logprobs: the sampler's ``log_softmax(logits / T)`` of each sampled token, same length.
        finished: True when the response ended with a stop/EOS token, False when cut by the length cap.
    """

    prompt_index: int
    response_ids: list[int]
    logprobs: list[float]
    finished: bool

    def __post_init__(self) -> None:
        assert len(self.response_ids) == len(self.logprobs), "one log-prob per response token"


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses from the current policy and follows the trainer's weights."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """``sampling.n`` rollouts per prompt, grouped by prompt in prompt order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's updated parameters (Hugging Face names) into the engine, in place."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...


def check_prompts(prompts: list[list[int]], sampling: SamplingConfig) -> None:
    """Raise TypeError/ValueError unless ``prompts`` is a list of non-empty token-id lists."""
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for i, ids in enumerate(prompts):
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"prompts[{i}] must be a list of int token ids, got {type(ids).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}] must be non-empty, got an empty list")
        if min(ids) < 0:
            raise ValueError(f"prompts[{i}] must hold non-negative token ids, got {min(ids)}")
