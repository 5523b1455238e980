"""Sampling n responses per problem through a rollout engine, with a resumable on-disk cache.

The cache is a JSONL file: a header line with the settings that decide the generations, then one line per finished
problem (its index, question, responses, response token counts and whether each response ended on a stop token).
Each batch of problems is appended as soon as it is generated, so an interrupted evaluation resumes with the
problems still missing; a cache made with other settings or other questions is refused, never mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsrl_fast.data import Problem
from dsrl_fast.eval.benchmarks import EvalSet
from dsrl_fast.eval.config import EvalConfig
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig
from dsrl_fast.templates import render_prompt

__all__ = ["CacheMismatch", "GenerationCache", "ProblemSamples", "encode_prompts", "generate_samples", "prompt_options"]

_FORMAT = "dsrl_fast.eval.generations/1"


class CacheMismatch(ValueError):
    """An existing generation cache was made with other settings or questions."""


@dataclass(frozen=True)
class ProblemSamples:
    """The n responses of one problem: decoded text, token count, and whether each ended on a stop token."""

    index: int
    problem: str
    responses: list[str]
    num_tokens: list[int]
    finished: list[bool]


class GenerationCache:
    """Finished problems of one (model, benchmark) pair in `path`.

    Args:
        path: the JSONL file (created with its parent directories).
        settings: JSON-serializable values that decide the generations; an existing file must hold the same.
    """

    def __init__(self, path: str | os.PathLike[str], settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))
        self.done: dict[int, ProblemSamples] = {}
        if self.path.is_file() and self.path.stat().st_size > 0:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = {"format": _FORMAT, "settings": self.settings}
            self.path.write_text(json.dumps(header) + "\n", encoding="utf-8")

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise CacheMismatch(f"{self.path} is not a generation cache (no {_FORMAT} header); remove it or choose "
                                f"another --output")
        old = header.get("settings", {})
        changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {self.settings.get(k)!r}" for k in changed)
            raise CacheMismatch(f"{self.path} was generated with other settings ({diff}); choose another --output "
                                f"or remove the file to regenerate")
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that problem is generated again
            self.done[record["index"]] = ProblemSamples(**record)

    def check_problems(self, problems: Sequence[Problem]) -> None:
        """Raise CacheMismatch when a cached problem's question differs from `problems` (the data changed)."""
        for index, cached in self.done.items():
            if index >= len(problems) or problems[index].prompt_text != cached.problem:
                raise CacheMismatch(f"{self.path}: problem {index} differs from the cached question; the data changed "
                                    f"since the cache was written (choose another --output or remove the file)")

    def append(self, records: Sequence[ProblemSamples]) -> None:
        """Add finished problems (one flushed line each)."""
        with self.path.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(asdict(record)) + "\n")
                self.done[record.index] = record


def prompt_options(cfg: EvalConfig, eval_set: EvalSet) -> tuple[str, bool]:
    """(template, add_special_tokens) of a benchmark: the config's, else the training defaults ("plain" with the
    tokenizer's BOS for the toy task, "qwen3_non_thinking" without special tokens otherwise)."""
    template = cfg.template if cfg.template is not None else ("plain" if eval_set.toy else "qwen3_non_thinking")
    special = cfg.add_special_tokens if cfg.add_special_tokens is not None else eval_set.toy
    return template, special


def encode_prompts(tokenizer: Any, problems: Sequence[Problem], template: str,
                   add_special_tokens: bool) -> list[list[int]]:
    """Prompt token ids of each problem: its text rendered with `template` (dsrl_fast.templates), then tokenized."""
    texts = [render_prompt(p.prompt_text, template, tokenizer) for p in problems]
    return [list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]


def generate_samples(engine: RolloutEngine, tokenizer: Any, problems: Sequence[Problem], prompts: Sequence[list[int]],
                     sampling: SamplingConfig, cache: GenerationCache, *, batch_size: int,
                     on_batch: Callable[[int], None] | None = None) -> list[ProblemSamples]:
    """`sampling.n` responses for every problem, reusing what `cache` holds and appending each new batch to it.

    prompts: token ids of each problem; sampling.seed (when set) is offset by each batch's first problem index.
    on_batch: called with the number of problems each finished batch added (progress bars).
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
        cache.append(records)
        if on_batch is not None:
            on_batch(len(chunk))
    return [cache.done[i] for i in range(len(problems))]
