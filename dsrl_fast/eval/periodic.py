"""Evaluation inside a training run: n samples per problem of several benchmarks through the run's own engine.

No cache and no files: each rank samples a contiguous block of every benchmark's problems (seeded by the global
problem index, so the samples do not depend on the number of ranks with vLLM), scores them with the run's reward,
and the per-problem Avg@n / Pass@k values are summed over ranks by `reduce`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dsrl_fast.data.problems import Problem
from dsrl_fast.errors import UserError
from dsrl_fast.eval.benchmarks import load_eval_set, parse_data_specs
from dsrl_fast.eval.pass_at_k import pass_at_k
from dsrl_fast.reward import RewardFn
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig

__all__ = ["HELD_OUT", "EvalTask", "evaluate_tasks", "load_benchmarks"]

HELD_OUT = "held_out"


@dataclass(frozen=True)
class EvalTask:
    """One benchmark of a training run: its label (metric names), problems and their prompt token ids."""

    label: str
    problems: list[Problem]
    prompts: list[list[int]]

    def __post_init__(self) -> None:
        if len(self.problems) != len(self.prompts):
            raise ValueError(f"problems and prompts must have the same length, got {len(self.problems)} and "
                             f"{len(self.prompts)}")


def evaluate_tasks(engine: RolloutEngine, tokenizer: Any, tasks: Sequence[EvalTask], reward_fn: RewardFn, *,
                   sampling: SamplingConfig, ks: Sequence[int] = (), rank: int = 0, world_size: int = 1,
                   reduce: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
    """{"<label>/avg@<n>": ..., "<label>/pass@<k>": ...} for every task (pass@k for each k in `ks` up to n).

    sampling: n, temperature, top_p, length cap and stop tokens of every call; its seed (when set) is offset by each
    block's first global problem index. reduce: sums a list of floats over ranks (None: one process). Tasks without
    problems are left out.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    n = sampling.n
    kept_ks = sorted({int(k) for k in ks if 1 <= k <= n})
    metrics: dict[str, float] = {}
    for task in tasks:
        if not task.problems:
            continue
        per_rank = math.ceil(len(task.problems) / world_size)
        mine = list(range(rank * per_rank, min(len(task.problems), (rank + 1) * per_rank)))
        sums = [0.0] * (2 + len(kept_ks))
        if mine:
            seed = None if sampling.seed is None else (sampling.seed + mine[0]) % (2**31 - 1)
            call = dataclasses.replace(sampling, seed=seed)
            rollouts = engine.generate([task.prompts[i] for i in mine], call)
            texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
            scores = reward_fn(texts, [task.problems[mine[r.prompt_index]].answer for r in rollouts])
            per_problem: list[list[float]] = [[] for _ in mine]
            for r, s in zip(rollouts, scores, strict=True):
                per_problem[r.prompt_index].append(float(s))
            for values in per_problem:
                correct = sum(v >= 1.0 for v in values)
                sums[0] += sum(values) / len(values)
                sums[1] += 1
                for j, k in enumerate(kept_ks):
                    sums[2 + j] += pass_at_k(len(values), correct, k)
        totals = reduce(sums) if reduce is not None else sums
        count = max(totals[1], 1.0)
        metrics[f"{task.label}/avg@{n}"] = totals[0] / count
        metrics.update({f"{task.label}/pass@{k}": totals[2 + j] / count for j, k in enumerate(kept_ks)})
    return metrics


def load_benchmarks(specs: str | None, *, limit: int | None = None) -> list[tuple[str, list[Problem]]]:
    """(label, problems) of each `dsrl-fast eval --data` spec in `specs` (comma-separated; None: none), the first
    `limit` problems of each; benchmark names read $DSRL_FAST_DATA (else ./data). UserError for a bad spec, a
    missing file or the reserved label "held_out"."""
    if specs is None:
        return []
    try:
        parsed = parse_data_specs(specs)
        if any(s.label == HELD_OUT for s in parsed):
            raise ValueError(f"eval_benchmarks must not use the label {HELD_OUT!r} (the training run's own held-out "
                             f"set), got {specs!r}")
        sets = [load_eval_set(s, limit=limit) for s in parsed]
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        raise UserError(f"eval_benchmarks: {exc}") from exc
    return [(s.label, s.problems) for s in sets]
