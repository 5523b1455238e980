"""`dsrl-fast analyze alignment`: sample rollouts of a model on a benchmark, then the gradient alignment of each.

Writes ``alignment.json`` (settings, a summary, every problem's question, reference and prompt token ids, and every
rollout's sampled response (token ids and text), dot product, cosine, norms, log-probs and per-token
log P(y|x) − log P(y), so that each number can be recomputed from the file) and ``alignment.png`` (histograms of the
dot products, the cosines and the per-token differences, like the paper's Fig. 2).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dsrl_fast.analysis.alignment import AlignmentResult, default_marginal_prefix, gradient_alignment
from dsrl_fast.eval.benchmarks import EvalSet
from dsrl_fast.eval.config import EvalConfig
from dsrl_fast.eval.generate import encode_prompts, prompt_options
from dsrl_fast.eval.models import (
    ModelSpec,
    load_tokenizer,
    model_positions,
    open_engine,
    resolve_engine,
    torch_dtype,
)
from dsrl_fast.eval.runner import progress_bar
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig

__all__ = ["AlignmentOutputs", "run_alignment", "summarize_alignment"]


@dataclass(frozen=True)
class AlignmentOutputs:
    """The per-rollout results, their summary and the written files."""

    results: list[AlignmentResult]
    summary: dict[str, float]
    json_path: str
    plot_path: str


def summarize_alignment(results: list[AlignmentResult]) -> dict[str, float]:
    """Rollouts, share with a non-negative dot product, mean / median dot and cosine, and the per-token
    difference's mean, standard deviation and share of positive values."""
    if not results:
        raise ValueError("results must be non-empty")
    dots = [r.dot for r in results]
    cosines = [r.cosine for r in results if math.isfinite(r.cosine)]
    diffs = [d for r in results for d in r.token_diff]
    return {
        "rollouts": len(results),
        "nonnegative_dot_share": sum(d >= 0 for d in dots) / len(dots),
        "dot_mean": statistics.fmean(dots),
        "dot_median": statistics.median(dots),
        "cosine_mean": statistics.fmean(cosines) if cosines else float("nan"),
        "cosine_median": statistics.median(cosines) if cosines else float("nan"),
        "token_diff_mean": statistics.fmean(diffs),
        "token_diff_std": statistics.pstdev(diffs),
        "token_diff_positive_share": sum(d > 0 for d in diffs) / len(diffs),
        "tokens": len(diffs),
    }


def _plot(results: list[AlignmentResult], summary: dict[str, float], title: str, path: Path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (
        ([r.dot for r in results], "<∇log P(y), ∇log P(y|x)>",
         f"{100 * summary['nonnegative_dot_share']:.1f}% ≥ 0, mean {summary['dot_mean']:.3g}"),
        ([r.cosine for r in results if math.isfinite(r.cosine)], "cosine similarity",
         f"mean {summary['cosine_mean']:.3f}"),
        ([d for r in results for d in r.token_diff], "log P(y_t|x) − log P(y_t) per token",
         f"mean {summary['token_diff_mean']:.3f}, {int(summary['tokens'])} tokens"),
    )
    for ax, (values, xlabel, note) in zip(axes, panels):
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        ax.set_title(note, fontsize=9)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return str(path)


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _load_hf_model(path: str, dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device).eval()


def run_alignment(model: ModelSpec, eval_set: EvalSet, cfg: EvalConfig, output_dir: str | Path, *,
                  impl: str = "auto", marginal_prefix: tuple[int, ...] | None = None,
                  open_fn: Callable[..., RolloutEngine] = open_engine) -> AlignmentOutputs:
    """cfg.n rollouts per problem of `eval_set` from `model`, then :func:`gradient_alignment` of each.

    Rollouts come from cfg.engine (vLLM or HF generate); gradients from the model loaded with transformers in
    cfg.dtype. marginal_prefix: default the tokenizer's <|im_start|>, else its BOS.
    """
    tokenizer = load_tokenizer(model.path)
    template, special = prompt_options(cfg, eval_set)
    prompts = encode_prompts(tokenizer, eval_set.problems, template, special)
    positions = model_positions(model.path)
    longest = max(len(p) for p in prompts)
    max_new = cfg.max_new_tokens if positions is None else min(cfg.max_new_tokens, positions - longest)
    if max_new < 1:
        raise ValueError(f"the longest prompt has {longest} tokens: no room for a response in {positions} positions")
    stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.n, max_new_tokens=max_new,
                              stop_token_ids=stop, seed=cfg.seed)
    engine = open_fn(model.path, resolve_engine(cfg.engine), dtype=cfg.dtype, seed=cfg.seed,
                     max_model_len=cfg.max_model_len or longest + max_new,
                     gpu_memory_utilization=cfg.gpu_memory_utilization, cpu_kv_cache_gib=cfg.cpu_kv_cache_gib)
    try:
        rollouts = engine.generate(prompts, sampling)
        hf_model = getattr(engine, "model", None)
    finally:
        engine.close()
    if not isinstance(hf_model, torch.nn.Module):
        hf_model = _load_hf_model(model.path, cfg.dtype)
    prefix = marginal_prefix or default_marginal_prefix(tokenizer)
    results = []
    with progress_bar(len(rollouts), f"alignment {model.label}/{eval_set.label}", cfg.progress, unit="rollout") as bar:
        for r in rollouts:
            results.append(gradient_alignment(hf_model, prompts[r.prompt_index], r.response_ids,
                                              marginal_prefix=prefix, impl=impl, temperature=cfg.temperature or 1.0))
            bar.update(1)
    summary = summarize_alignment(results)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    problems = [{"index": i, "problem": p.prompt_text, "answer": p.answer, "prompt_ids": list(prompts[i])}
                for i, p in enumerate(eval_set.problems)]
    records: list[dict[str, Any]] = [
        {"problem": r.prompt_index, "response_tokens": len(r.response_ids), "finished": bool(r.finished),
         "response_ids": list(r.response_ids), "response": text, **asdict(a)}
        for r, text, a in zip(rollouts, texts, results, strict=True)]
    settings = {"model": model.path, "data": eval_set.label, "marginal_prefix": list(prefix), "impl": impl,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                "max_new_tokens": max_new}
    json_path = out / "alignment.json"
    document = _finite({"settings": settings, "summary": summary, "problems": problems, "rollouts": records})
    json_path.write_text(json.dumps(document, indent=1, allow_nan=False), encoding="utf-8")
    plot = _plot(results, summary, f"{model.label} on {eval_set.label}: ∇log P(y) vs ∇log P(y|x)",
                 out / "alignment.png")
    return AlignmentOutputs(results, summary, str(json_path), plot)
