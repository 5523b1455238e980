"""Evaluation outputs: Markdown / CSV / JSON tables, per-problem correct counts and the Pass@k plot.

Every table states what its numbers were made with (the scorer, the length cap, n, temperature and top_p): a
Markdown line under each benchmark's heading, columns of every CSV / JSON row.

Thought-taxonomy ratios compare each model with the first one given (the base model), per benchmark, as the paper
compares NSR-PreRL with the base model (transition ×14.89, reflection ×6.54).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dsrl_fast.eval.scoring import BenchmarkResult, ProblemScores

__all__ = ["plot_pass_at_k", "result_rows", "settings_line", "thought_ratios", "write_problem_counts", "write_tables"]


def thought_ratios(results: Sequence[BenchmarkResult]) -> dict[tuple[str, str], dict[str, float | None]]:
    """{(model, benchmark): {"transition": x, "reflection": y}}: each share over the first model's share on the same
    benchmark (None where that share is 0)."""
    base: dict[str, BenchmarkResult] = {}
    for r in results:
        base.setdefault(r.benchmark, r)
    ratios = {}
    for r in results:
        b = base[r.benchmark].thoughts.shares()
        mine = r.thoughts.shares()
        ratios[(r.model, r.benchmark)] = {label: (mine[label] / b[label] if b[label] > 0 else None)
                                          for label in ("transition", "reflection")}
    return ratios


def result_rows(results: Sequence[BenchmarkResult]) -> list[dict[str, Any]]:
    """One flat dict per (model, benchmark): the CSV / JSON row."""
    ratios = thought_ratios(results)
    rows = []
    for r in results:
        row: dict[str, Any] = {"model": r.model, "benchmark": r.benchmark, "problems": r.problems, "n": r.n,
                               **asdict(r.settings), f"avg@{r.n}": r.avg}
        row.update({f"pass@{k}": v for k, v in r.pass_at_k.items()})
        row.update({f"maj@{k}": v for k, v in r.maj_at_k.items()})
        shares = r.thoughts.shares()
        row.update({"mean_tokens": r.mean_tokens, "truncated": r.truncated, "reasoning_steps": r.thoughts.steps,
                    "transition_share": shares["transition"], "reflection_share": shares["reflection"],
                    "execution_share": shares["execution"],
                    "transition_ratio": ratios[(r.model, r.benchmark)]["transition"],
                    "reflection_ratio": ratios[(r.model, r.benchmark)]["reflection"]})
        rows.append(row)
    return rows


def _fraction(value: float) -> str:
    """Accuracies and shares print as fractions in [0, 1], as train prints them and every file stores them."""
    return f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"×{value:.2f}"


_SETTING_LABELS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("scorer", "scorer", str), ("max_new_tokens", "length cap", lambda v: f"{v} tokens"),
    ("temperature", "temperature", str), ("top_p", "top_p", str))


def settings_line(rows: Sequence[BenchmarkResult]) -> str:
    """"scorer X · length cap N tokens · n = K · temperature T · top_p P" of one benchmark's rows; a model whose value
    differs from the first model's is named after it ("length cap 8192 tokens (small: 2000 tokens)")."""
    parts = []
    for name, label, show in _SETTING_LABELS:
        values = {r.model: getattr(r.settings, name) for r in rows}
        first = next(iter(values.values()))
        others = ", ".join(f"{model}: {show(v)}" for model, v in values.items() if v != first)
        parts.append(f"{label} {show(first)}" + (f" ({others})" if others else ""))
    parts.insert(2, f"n = {rows[0].n}")
    return " · ".join(parts)


def markdown(results: Sequence[BenchmarkResult]) -> str:
    """The tables as Markdown: per benchmark, accuracy and the thought taxonomy, as fractions in [0, 1] (the
    reasoning steps column counts the steps the responses were split into, not training steps)."""
    ratios = thought_ratios(results)
    lines: list[str] = []
    for bench in dict.fromkeys(r.benchmark for r in results):
        rows = [r for r in results if r.benchmark == bench]
        n = rows[0].n
        ks = list(rows[0].pass_at_k)
        top = ks[-1]
        lines += [f"### {bench} ({rows[0].problems} problems, n = {n})", "", settings_line(rows), "",
                  "| model | Avg@" + str(n) + " | " + " | ".join(f"pass@{k}" for k in ks) + f" | maj@{top} | tokens |",
                  "|---|" + "---:|" * (len(ks) + 3)]
        for r in rows:
            cells = [_fraction(r.avg), *(_fraction(r.pass_at_k[k]) for k in ks), _fraction(r.maj_at_k[top]),
                     f"{r.mean_tokens:.0f}"]
            lines.append(f"| {r.model} | " + " | ".join(cells) + " |")
        lines += ["", ("| model | reasoning steps | transition share | reflection share | execution share | "
                       "transition vs first | reflection vs first |"), "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            s = r.thoughts.shares()
            q = ratios[(r.model, r.benchmark)]
            lines.append(f"| {r.model} | {r.thoughts.steps} | {_fraction(s['transition'])} | "
                         f"{_fraction(s['reflection'])} | {_fraction(s['execution'])} | {_ratio(q['transition'])} | "
                         f"{_ratio(q['reflection'])} |")
        lines.append("")
    return "\n".join(lines)


def write_tables(results: Sequence[BenchmarkResult], out_dir: str | Path,
                 settings: dict[str, Any]) -> dict[str, str]:
    """Write results.md, results.csv and results.json (with `settings`) into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(results)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    paths["markdown"].write_text(markdown(results), encoding="utf-8")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    clean = [{k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None) for k, v in row.items()}
             for row in rows]
    paths["json"].write_text(json.dumps({"settings": settings, "results": clean}, indent=2), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def write_problem_counts(scores: Sequence[ProblemScores], path: str | Path) -> str:
    """A CSV of index, reference, n, correct per problem."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "reference", "n", "correct"])
        for s in scores:
            writer.writerow([s.index, s.reference, len(s.scores), s.num_correct])
    return str(path)


def plot_pass_at_k(results: Sequence[BenchmarkResult], path: str | Path) -> str:
    """Pass@k against k (log scale), one panel per benchmark and one line per model; returns the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benches = list(dict.fromkeys(r.benchmark for r in results))
    cols = min(3, len(benches))
    rows = math.ceil(len(benches) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, bench in zip(axes, benches):
        for r in (r for r in results if r.benchmark == bench):
            ks = list(r.pass_at_k)
            ax.plot(ks, [r.pass_at_k[k] for k in ks], marker="o", markersize=3, label=r.model)
        ax.set_xscale("log", base=2)
        ticks = sorted({k for r in results if r.benchmark == bench for k in r.pass_at_k})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
        ax.set_title(bench)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(benches):]:
        ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return str(path)
