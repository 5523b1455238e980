"""`dsrl-fast eval` end to end: every model on every benchmark, then tables, per-problem counts and the plot.

Layout of the output directory:

- ``results.md`` / ``results.csv`` / ``results.json``: one row per (model, benchmark): Avg@n, Pass@k and maj@k for
  each asked k <= n, mean response tokens, the share cut by the length cap, the thought-taxonomy shares and their
  ratio to the first model;
- ``pass_at_k.png``: Pass@k curves, one panel per benchmark, one line per model;
- ``problems/<model>/<benchmark>.csv``: correct responses of each problem;
- ``generations/<model>/<benchmark>.jsonl``: the responses themselves, also the cache an interrupted run resumes
  from (a benchmark whose cache is complete does not even load its model), keyed by the model's content
  (:mod:`dsrl_fast.eval.cache`); ``generations/model_digests.json`` remembers the model files' digests.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dsrl_fast.eval.benchmarks import DataSpec, EvalSet, load_eval_set
from dsrl_fast.eval.config import EvalConfig
from dsrl_fast.eval.cache import GenerationCache
from dsrl_fast.eval.fingerprint import model_digest
from dsrl_fast.eval.generate import encode_prompts, generate_samples, prompt_options
from dsrl_fast.eval.models import ModelSpec, load_tokenizer, model_positions, open_engine, resolve_engine
from dsrl_fast.eval.report import plot_pass_at_k, write_problem_counts, write_tables
from dsrl_fast.eval.scoring import BenchmarkResult, RowSettings, score_samples, summarize
from dsrl_fast.reward import RewardFn, get_reward_fn
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig
from dsrl_fast.interrupt import StopRequest

__all__ = ["DIGESTS", "EvalOutputs", "load_eval_sets", "progress_bar", "run_eval"]

DIGESTS = "model_digests.json"


@dataclass(frozen=True)
class EvalOutputs:
    """What an evaluation wrote: the results and the paths of its tables ("markdown", "csv", "json") and plot."""

    results: list[BenchmarkResult]
    tables: dict[str, str]
    plot: str
    output_dir: str


def load_eval_sets(data: Sequence[DataSpec], cfg: EvalConfig) -> list[EvalSet]:
    """The problems of every data spec, with the config's key options and limit."""
    return [load_eval_set(spec, data_dir=cfg.data_dir, limit=cfg.limit, problem_key=cfg.problem_key,
                          answer_key=cfg.answer_key, answer_mode=cfg.answer_mode,  # type: ignore[arg-type]
                          toy_seed=cfg.toy_seed, toy_train_size=cfg.toy_train_size,
                          toy_eval_size=cfg.toy_eval_size) for spec in data]


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "problem") -> Any:
    """A tqdm bar (hidden when not `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


@dataclass(frozen=True)
class _Run:
    """What every model of one evaluation shares."""

    cfg: EvalConfig
    out: Path
    reward_fn: RewardFn
    scorer: str
    engine_name: str
    open_fn: Callable[..., RolloutEngine]
    stop: StopRequest | None


def _eval_model(model: ModelSpec, sets: Sequence[EvalSet], run: _Run) -> list[BenchmarkResult]:
    cfg, out = run.cfg, run.out
    tokenizer = load_tokenizer(model.path)
    positions = model_positions(model.path)
    digest = model_digest(model.path, out / "generations" / DIGESTS)
    jobs = []
    for s in sets:
        template, special = prompt_options(cfg, s)
        prompts = encode_prompts(tokenizer, s.problems, template, special)
        longest = max(len(p) for p in prompts)
        max_new = cfg.max_new_tokens if positions is None else min(cfg.max_new_tokens, positions - longest)
        if max_new < 1:
            raise ValueError(f"{s.label}: the longest prompt has {longest} tokens, which leaves no room for a "
                             f"response within {model.label}'s {positions} positions")
        settings = {"model_digest": digest, "data": s.label, **cfg.sampling_settings(), "template": template,
                    "add_special_tokens": special, "max_new_tokens": max_new}
        cache = GenerationCache(out / "generations" / model.label / f"{s.label}.jsonl", settings, model.path)
        cache.check_problems(s.problems)
        jobs.append((s, prompts, max_new, cache))
    engine = None
    if any(len(cache.done) < len(s.problems) for s, _, _, cache in jobs):
        longest_seq = max(max(len(p) for p in prompts) + max_new for _, prompts, max_new, _ in jobs)
        engine = run.open_fn(model.path, run.engine_name, dtype=cfg.dtype, seed=cfg.seed,
                             max_model_len=cfg.max_model_len or longest_seq,
                             gpu_memory_utilization=cfg.gpu_memory_utilization,
                             cpu_kv_cache_gib=cfg.cpu_kv_cache_gib)
    results = []
    try:
        for s, prompts, max_new, cache in jobs:
            stop_ids = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
            sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.n, max_new_tokens=max_new,
                                      stop_token_ids=stop_ids, seed=cfg.seed)
            with progress_bar(len(s.problems), f"{model.label}/{s.label}", cfg.progress) as bar:
                bar.update(sum(1 for i in range(len(s.problems)) if i in cache.done))
                samples = generate_samples(engine, tokenizer, s.problems, prompts, sampling,  # type: ignore[arg-type]
                                           cache, batch_size=cfg.batch_size, on_batch=bar.update, stop=run.stop)
            scores = score_samples(samples, s.problems, run.reward_fn)
            write_problem_counts(scores, out / "problems" / model.label / f"{s.label}.csv")
            settings = RowSettings(run.scorer, max_new, cfg.temperature, cfg.top_p)
            results.append(summarize(model.label, s.label, samples, scores, cfg.ks, settings))
    finally:
        if engine is not None:
            engine.close()
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def run_eval(models: Sequence[ModelSpec], sets: Sequence[EvalSet], cfg: EvalConfig, output_dir: str | Path, *,
             reward_fn: RewardFn | None = None, open_fn: Callable[..., RolloutEngine] = open_engine,
             stop: StopRequest | None = None) -> EvalOutputs:
    """Sample cfg.n responses per problem from each model on each benchmark, score them, write the outputs.

    sets: the benchmarks (:func:`load_eval_sets`). reward_fn: scores responses (default: get_reward_fn(cfg.reward),
    closed afterwards; the tables name the scorer cfg.reward, or a given function by its name). open_fn: builds a
    model's engine (default: :func:`dsrl_fast.eval.models.open_engine`). stop: the caller's installed stop request
    (`dsrl-fast eval` stops at once on a signal): cache and table writes finish before it stops the run.
    """
    if not models or not sets:
        raise ValueError(f"models and sets must be non-empty, got {len(models)} models and {len(sets)} data sets")
    out = Path(output_dir)
    own_reward = reward_fn is None
    reward = get_reward_fn(cfg.reward) if reward_fn is None else reward_fn
    scorer = cfg.reward if reward_fn is None else getattr(reward_fn, "__qualname__", type(reward_fn).__qualname__)
    run = _Run(cfg, out, reward, scorer, resolve_engine(cfg.engine), open_fn, stop)
    results: list[BenchmarkResult] = []
    try:
        for model in models:
            results += _eval_model(model, sets, run)
    finally:
        close = getattr(reward, "close", None)
        if own_reward and close is not None:
            close()
    settings = {"models": [asdict(m) for m in models], "data": [s.label for s in sets], "engine": run.engine_name,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}, "scorer": scorer}
    with stop.deferred() if stop is not None else nullcontext():
        tables = write_tables(results, out, settings)
        plot = plot_pass_at_k(results, out / "pass_at_k.png")
    return EvalOutputs(results, tables, plot, str(out))
