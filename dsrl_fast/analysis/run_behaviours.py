"""`dsrl-fast analyze behaviours`: a local judge model labels the responses of an evaluation's generations.

Reads ``generations/<model>/<benchmark>.jsonl`` of a `dsrl-fast eval` output directory, asks the judge (any local
causal LM, through vLLM or HF generate, its chat template by default) about each response with the paper's prompt,
parses the answers and writes ``behaviours.json`` (every judgement with the judge's raw output),
``behaviours.csv`` and ``behaviours.md`` (share of responses showing each behaviour, per model and benchmark).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsrl_fast.analysis.behaviours import BEHAVIOURS, Judgement, behaviour_shares, judge_prompt, parse_judgement
from dsrl_fast.eval.cache import ProblemSamples
from dsrl_fast.eval.config import EvalConfig
from dsrl_fast.eval.models import ModelSpec, load_tokenizer, model_positions, open_engine, resolve_engine
from dsrl_fast.eval.runner import progress_bar
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig
from dsrl_fast.data.templates import render_prompt

__all__ = ["BehaviourOutputs", "find_generations", "run_behaviours"]

_TRUNCATED = "\n[... truncated ...]"


@dataclass(frozen=True)
class BehaviourOutputs:
    """{(model, benchmark): shares} and the written files."""

    shares: dict[tuple[str, str], dict[str, float]]
    json_path: str
    csv_path: str
    markdown_path: str


def find_generations(eval_dir: str | Path) -> list[tuple[str, str, Path]]:
    """(model, benchmark, file) of every generation file of an eval output directory, sorted."""
    root = Path(eval_dir) / "generations"
    files = sorted(root.glob("*/*.jsonl")) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{str(root)!r} holds no <model>/<benchmark>.jsonl generation files: pass the "
                                f"--output directory of a `dsrl-fast eval` run")
    return [(f.parent.name, f.stem, f) for f in files]


def _read_responses(path: Path, limit: int | None) -> list[str]:
    """Responses of a generation file, problem by problem, the first `limit` in all."""
    responses: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        try:
            record = ProblemSamples(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        responses.extend(record.responses)
    return responses[:limit] if limit else responses


def _encode_judge_prompt(tokenizer: Any, reasoning: str, template: str, budget: int) -> list[int]:
    """The judge prompt's ids, the reasoning cut (with a marker) so the prompt fits `budget` tokens."""
    ids = tokenizer(render_prompt(judge_prompt(reasoning), template, tokenizer), add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return list(ids)
    reasoning_ids = tokenizer(reasoning, add_special_tokens=False)["input_ids"]
    keep = max(0, len(reasoning_ids) - (len(ids) - budget) - 16)
    cut = tokenizer.decode(reasoning_ids[:keep]) + _TRUNCATED
    ids = tokenizer(render_prompt(judge_prompt(cut), template, tokenizer), add_special_tokens=False)["input_ids"]
    if len(ids) > budget:
        raise ValueError(f"the judge prompt alone needs {len(ids)} tokens, more than the judge's budget of {budget}")
    return list(ids)


def run_behaviours(judge: ModelSpec, eval_dir: str | Path, cfg: EvalConfig, output_dir: str | Path, *,
                   open_fn: Callable[..., RolloutEngine] = open_engine) -> BehaviourOutputs:
    """Judge every response (the first cfg.limit per model and benchmark when set) of the eval run in `eval_dir`.

    The judge decodes with cfg.temperature (0 = greedy), up to cfg.max_new_tokens, prompts rendered with
    cfg.template (default "chat", the judge's chat template).
    """
    files = find_generations(eval_dir)
    tokenizer = load_tokenizer(judge.path)
    template = cfg.template or "chat"
    positions = model_positions(judge.path)
    budget = (positions - cfg.max_new_tokens) if positions else 1 << 30
    if budget < 1:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the judge's "
                         f"{positions} positions")
    jobs = [(model, bench, _read_responses(path, cfg.limit)) for model, bench, path in files]
    prompts = {key: [_encode_judge_prompt(tokenizer, r, template, budget) for r in responses]
               for key, responses in ((j[:2], j[2]) for j in jobs)}
    longest = max((len(p) for ps in prompts.values() for p in ps), default=1)
    engine = open_fn(judge.path, resolve_engine(cfg.engine), dtype=cfg.dtype, seed=cfg.seed,
                     max_model_len=cfg.max_model_len or longest + cfg.max_new_tokens,
                     gpu_memory_utilization=cfg.gpu_memory_utilization, cpu_kv_cache_gib=cfg.cpu_kv_cache_gib)
    stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    records: list[dict[str, Any]] = []
    shares: dict[tuple[str, str], dict[str, float]] = {}
    try:
        for model, bench, responses in jobs:
            judgements: list[Judgement] = []
            batch = prompts[(model, bench)]
            with progress_bar(len(batch), f"judge {model}/{bench}", cfg.progress, unit="response") as bar:
                for start in range(0, len(batch), cfg.batch_size):
                    chunk = batch[start:start + cfg.batch_size]
                    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, n=1,
                                              max_new_tokens=cfg.max_new_tokens, stop_token_ids=stop,
                                              seed=cfg.seed + start)
                    outs = engine.generate(chunk, sampling)
                    texts = tokenizer.batch_decode([o.response_ids for o in outs], skip_special_tokens=True)
                    for i, text in enumerate(texts):
                        j = parse_judgement(text)
                        judgements.append(j)
                        records.append({"model": model, "benchmark": bench, "response": start + i,
                                        "behaviours": sorted(j.behaviours), "parsed": j.parsed, "judge_output": text})
                    bar.update(len(chunk))
            shares[(model, bench)] = behaviour_shares(judgements)
    finally:
        engine.close()
    return _write(shares, records, judge, cfg, Path(output_dir))


def _write(shares: dict[tuple[str, str], dict[str, float]], records: list[dict[str, Any]], judge: ModelSpec,
           cfg: EvalConfig, out: Path) -> BehaviourOutputs:
    out.mkdir(parents=True, exist_ok=True)
    columns = [*BEHAVIOURS, "none", "unparsed"]
    rows = [{"model": m, "benchmark": b, "responses": sum(1 for r in records if r["model"] == m and
                                                          r["benchmark"] == b), **s} for (m, b), s in shares.items()]
    json_path, csv_path, md_path = out / "behaviours.json", out / "behaviours.csv", out / "behaviours.md"
    settings = {"judge": judge.path, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    json_path.write_text(json.dumps({"settings": settings, "shares": rows, "judgements": records}, indent=1),
                         encoding="utf-8")
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "benchmark", "responses", *columns])
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| model | benchmark | responses | " + " | ".join(f"{c} %" for c in columns) + " |",
             "|---|---|---:|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['benchmark']} | {row['responses']} | "
                     + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + " |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return BehaviourOutputs(shares, str(json_path), str(csv_path), str(md_path))
