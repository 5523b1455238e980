"""Sampling n responses per problem through a rollout engine, resumable through a :class:`GenerationCache`.

Each batch of problems is appended to the cache as soon as it is generated (a write a stop signal never cuts), so an
interrupted evaluation resumes with the problems still missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

from dsrl_fast.data.problems import Problem
from dsrl_fast.eval.benchmarks import EvalSet
from dsrl_fast.eval.cache import GenerationCache, ProblemSamples
from dsrl_fast.eval.config import EvalConfig
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig
from dsrl_fast.data.templates import render_prompt
from dsrl_fast.interrupt import StopRequest

__all__ = ["encode_prompts", "generate_samples", "prompt_options"]


def prompt_options(cfg: EvalConfig, eval_set: EvalSet) -> tuple[str, bool]:
    """(template, add_special_tokens) of a benchmark: the config's, else the training defaults ("plain" with the
    tokenizer's BOS for the toy task, "qwen3_non_thinking" without special tokens otherwise)."""
    template = cfg.template if cfg.template is not None else ("plain" if eval_set.toy else "qwen3_non_thinking")
    special = cfg.add_special_tokens if cfg.add_special_tokens is not None else eval_set.toy
    return template, special


def encode_prompts(tokenizer: Any, problems: Sequence[Problem], template: str,
                   add_special_tokens: bool) -> list[list[int]]:
    """Prompt token ids of each problem: its text rendered with `template` (dsrl_fast.data.templates), then tokenized."""
    texts = [render_prompt(p.prompt_text, template, tokenizer) for p in problems]
    return [list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]


def generate_samples(engine: RolloutEngine, tokenizer: Any, problems: Sequence[Problem], prompts: Sequence[list[int]],
                     sampling: SamplingConfig, cache: GenerationCache, *, batch_size: int,
                     on_batch: Callable[[int], None] | None = None,
                     stop: StopRequest | None = None) -> list[ProblemSamples]:
    """`sampling.n` responses for every problem, reusing what `cache` holds and appending each new batch to it.

    prompts: token ids of each problem; sampling.seed (when set) is offset by each batch's first problem index.
    on_batch: called with the number of problems each finished batch added (progress bars).
    stop: the run's stop request; its signals wait for a cache write to end (:meth:`StopRequest.deferred`).
    Returns one ProblemSamples per problem, in problem order.
    """
    if len(problems) != len(prompts):
        raise ValueError(f"problems and prompts must have the same length, got {len(problems)} and {len(prompts)}")
    cache.check_problems(problems)
    todo = [i for i in range(len(problems)) if i not in cache.done]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        seed = None if sampling.seed is None else (sampling.seed * 1_000_003 + chunk[0]) % (2**31 - 1)
        call = dataclasses.replace(sampling, seed=seed)
        rollouts = engine.generate([list(prompts[i]) for i in chunk], call)
        texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
        grouped: list[list[int]] = [[] for _ in chunk]
        for j, rollout in enumerate(rollouts):
            grouped[rollout.prompt_index].append(j)
        records = []
        for local, index in enumerate(chunk):
            rows = grouped[local]
            assert len(rows) == sampling.n, "the engine returns n rollouts per prompt"
            records.append(ProblemSamples(index, problems[index].prompt_text, [texts[j] for j in rows],
                                          [len(rollouts[j].response_ids) for j in rows],
                                          [bool(rollouts[j].finished) for j in rows]))
        with stop.deferred() if stop is not None else nullcontext():
            cache.append(records)
        if on_batch is not None:
            on_batch(len(chunk))
    return [cache.done[i] for i in range(len(problems))]
