"""Evaluation sets by name or path: the paper's six math benchmarks, the toy task, user files, Hugging Face datasets.

A data spec is one of:

- a benchmark name (:data:`BENCHMARKS`, aliases :data:`ALIASES`): ``<data_dir>/benchmarks/<name>/test.jsonl`` read
  with that benchmark's fields (the math-evaluation-harness JSONL layout);
- ``toy``: the embedded addition task's held-out problems (the training run's, with the demo's defaults);
- a ``.jsonl`` / ``.parquet`` path, or ``hf:<dataset>[:<split>]`` (default split "test"), read with the
  problem_key / answer_key / answer_mode options;
- ``<label>=<path or hf:...>``: the same, labelled; when the label is a benchmark name its fields are the defaults
  (``math500=hf:HuggingFaceH4/MATH-500:test``).

The reference answers of the six benchmarks (and of a source labelled with one's name) are read in the plain form a
model writes (:func:`plain_answer`). The shipped AIME24 file writes 7 of its 30 integers with leading zeros (``025``;
the authors' file has ``25``) and OlympiadBench's list answers (and one Minerva answer) keep their ``$…$`` math
delimiters: against those references the Hendrycks string check (``hendrycks_math``, the authors' scorer) gives a
correct ``\\boxed{25}`` or ``\\boxed{2n-2}`` 0.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsrl_fast.data.problems import AnswerMode, Problem, load_hf_problems, load_problems

__all__ = ["ALIASES", "BENCHMARKS", "BenchmarkFormat", "EvalSet", "default_data_dir", "load_eval_set",
           "parse_data_specs", "plain_answer"]


@dataclass(frozen=True)
class BenchmarkFormat:
    """Where a benchmark keeps its question and reference answer, and how the answer is read
    (:mod:`dsrl_fast.data.problems`'s answer modes)."""

    problem_key: str
    answer_key: str
    answer_mode: AnswerMode


BENCHMARKS: dict[str, BenchmarkFormat] = {
    "math500": BenchmarkFormat("problem", "answer", "field"),
    "aime24": BenchmarkFormat("problem", "answer", "field"),
    "aime25": BenchmarkFormat("problem", "answer", "field"),
    "amc23": BenchmarkFormat("problem", "answer", "field"),
    "minerva_math": BenchmarkFormat("problem", "solution", "boxed"),
    "olympiadbench": BenchmarkFormat("question", "final_answer", "list"),
}
ALIASES = {"minerva": "minerva_math", "olympiad": "olympiadbench", "math_500": "math500", "aime2024": "aime24",
           "aime2025": "aime25", "amc": "amc23"}
TOY = "toy"
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_MATH_DELIMITER_RE = re.compile(r"(?<!\\)\$")  # an unescaped $; \$ is a dollar sign
_LEADING_ZEROS_RE = re.compile(r"([-+]?)0+(\d+)", re.ASCII)


@dataclass(frozen=True)
class DataSpec:
    """One parsed data spec: its label (file names, table rows), a source and the benchmark whose fields apply."""

    label: str
    source: str | None  # a path or hf:...; None for a named benchmark file or the toy task
    benchmark: str | None  # a BENCHMARKS key, TOY, or None for a user source


@dataclass(frozen=True)
class EvalSet:
    """The problems of one benchmark; `toy` marks the embedded task (its prompts get the toy template)."""

    label: str
    problems: list[Problem]
    toy: bool = False


def default_data_dir() -> Path:
    """$DSRL_FAST_DATA, else ./data."""
    return Path(os.environ.get("DSRL_FAST_DATA", "data"))


def plain_answer(answer: str) -> str:
    """A benchmark reference in its plain form: without ``$`` math delimiters (``$2n-2$`` → ``2n-2``), and an
    integer without leading zeros (``025`` → ``25``; a sign is kept: Minerva asks for ``+2``). Raises ValueError
    when nothing is left."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    plain = _MATH_DELIMITER_RE.sub("", answer).strip()
    zeros = _LEADING_ZEROS_RE.fullmatch(plain)
    if zeros:
        plain = zeros[1] + zeros[2]
    if not plain:
        raise ValueError(f"answer must hold more than $ delimiters and spaces, got {answer!r}")
    return plain


def _plain_answers(problems: list[Problem], label: str) -> list[Problem]:
    out = []
    for i, p in enumerate(problems):
        try:
            out.append(dataclasses.replace(p, answer=plain_answer(p.answer)))
        except ValueError as exc:
            raise ValueError(f"{label}: problem {i}: {exc}") from exc
    return out


def _canonical(name: str) -> str | None:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in BENCHMARKS or key == TOY else None


def _label_of(source: str) -> str:
    if source.startswith("hf:"):
        name = source[3:].split(":", 1)[0]
        return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name.rsplit("/", 1)[-1]) or "dataset"
    path = Path(source)
    stem = path.stem if path.stem not in ("test", "train", "validation") else path.parent.name or path.stem
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", stem) or "data"


def parse_data_specs(text: str) -> list[DataSpec]:
    """The comma-separated specs of `--data` (see the module docstring); labels must be distinct."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"data must name benchmarks or files, e.g. math500,aime24 or my.jsonl, got {text!r}")
    specs = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        label, sep, source = item.partition("=")
        if sep:
            label, source = label.strip(), source.strip()
            if not _LABEL_RE.match(label):
                raise ValueError(f"data label must use letters, digits, _ . -, got {label!r} in {item!r}")
            if not source:
                raise ValueError(f"data {item!r} must give a source after '='")
            bench = _canonical(label)
            specs.append(DataSpec(label, source, bench if bench != TOY else None))
            continue
        bench = _canonical(item)
        if bench is not None:
            specs.append(DataSpec(bench, None, bench))
        elif item.startswith("hf:") or item.endswith((".jsonl", ".parquet")):
            specs.append(DataSpec(_label_of(item), item, None))
        else:
            names = ", ".join([*BENCHMARKS, TOY])
            raise ValueError(f"data {item!r} is neither a benchmark ({names}), a .jsonl/.parquet file nor "
                             f"hf:<dataset>[:<split>]")
    labels = [s.label for s in specs]
    duplicates = sorted({lab for lab in labels if labels.count(lab) > 1})
    if duplicates:
        raise ValueError(f"data labels must be distinct, got {duplicates} more than once (use label=source)")
    return specs


def load_eval_set(spec: DataSpec, *, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None,
                  problem_key: str | None = None, answer_key: str | None = None,
                  answer_mode: AnswerMode | None = None, toy_seed: int = 0, toy_train_size: int = 7000,
                  toy_eval_size: int = 200) -> EvalSet:
    """The problems of `spec` (the first `limit` when given). Key options override the benchmark's fields; a
    benchmark's reference answers are in their plain form (:func:`plain_answer`).

    Raises FileNotFoundError naming the expected path when a benchmark file is missing.
    """
    if spec.benchmark == TOY:
        from dsrl_fast.data.toy import make_addition_problems

        drawn = make_addition_problems(toy_train_size + toy_eval_size, seed=toy_seed)
        held_out = drawn[toy_train_size:]
        return EvalSet(spec.label, held_out[:limit] if limit else held_out, toy=True)
    fmt = BENCHMARKS.get(spec.benchmark or "", BenchmarkFormat("problem", "answer", "field"))
    keys: dict[str, Any] = {"problem_key": problem_key or fmt.problem_key, "answer_key": answer_key or fmt.answer_key,
                            "answer_mode": answer_mode or fmt.answer_mode, "limit": limit}
    problems = _read_problems(spec, data_dir, keys)
    return EvalSet(spec.label, _plain_answers(problems, spec.label) if spec.benchmark in BENCHMARKS else problems)


def _read_problems(spec: DataSpec, data_dir: str | os.PathLike[str] | None, keys: dict[str, Any]) -> list[Problem]:
    source = spec.source
    if source is None:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        path = root / "benchmarks" / spec.label / "test.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"benchmark {spec.label!r} expects {str(path)!r}, which does not exist: set "
                                    f"data_dir=<dir holding benchmarks/{spec.label}/test.jsonl> or $DSRL_FAST_DATA, "
                                    f"or pass {spec.label}=<file.jsonl | hf:dataset[:split]>")
        return load_problems(path, **keys)
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        if not name:
            raise ValueError(f"data {source!r} must name a dataset after 'hf:'")
        return load_hf_problems(name, split or "test", **keys)
    return load_problems(source, **keys)
