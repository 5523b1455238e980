"""Math problems from JSONL / Parquet files or Hugging Face datasets, and a resumable sampler.

Answers come from one field, in one of three modes:

- ``"field"``: the field's value as a string;
- ``"boxed"``: the last ``\\boxed{}`` of the field (minerva_math keeps its answer in ``solution``);
- ``"list"``: a list, or a list rendered as a string such as ``"['2']"`` (olympiadbench's
  ``final_answer``), joined with ``", "``.

Answers are exact. A number is written as the exact decimal its source text spells, never through a binary
float: JSON ``7.0`` → ``"7"``, ``2.50`` → ``"2.5"``, ``1e30`` → ``"1"`` and 30 zeros, ``1e-3`` → ``"0.001"`` (a
Parquet or Hugging Face float, which has no source text, by its shortest round-trip form: ``1e+30`` → the same 31
digits).
Non-finite numbers (``NaN``, ``Infinity``), booleans, numbers that would take more than
:data:`MAX_NUMBER_DIGITS` digits, and empty or whitespace-only answers are errors naming the file and line (an empty
answer is an :class:`EmptyAnswerError`); ``empty_answers="skip"`` skips rows with an empty answer instead and logs how
many. JSONL files must be UTF-8
(a byte-order mark at the start is accepted); an undecodable byte is an error naming the file, line and column.
"""

from __future__ import annotations

import ast
import decimal
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dsrl_fast.reward import extract_boxed

__all__ = ["MAX_NUMBER_DIGITS", "AnswerMode", "EmptyAnswerError", "EmptyAnswers", "Problem", "PromptSampler",
           "load_hf_problems", "load_problems"]

logger = logging.getLogger(__name__)

AnswerMode = Literal["field", "boxed", "list"]
ANSWER_MODES = ("field", "boxed", "list")
EmptyAnswers = Literal["error", "skip"]
EMPTY_ANSWERS = ("error", "skip")
MAX_NUMBER_DIGITS = 1000


@dataclass(frozen=True)
class _JsonNumber:
    """A JSON number as its source text (the parser's hook; turned into int/float outside answers)."""

    text: str

    def value(self) -> int | float:
        try:
            return int(self.text)
        except ValueError:
            return float(self.text)


def _plain_numbers(value: Any) -> Any:
    if isinstance(value, _JsonNumber):
        return value.value()
    if isinstance(value, dict):
        return {k: _plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(v) for v in value]
    return value


def _exact_decimal(text: str, where: str, key: str) -> str:
    """The exact decimal that number text spells, without exponent or trailing fractional zeros."""
    try:
        number = decimal.Decimal(text)
    except decimal.InvalidOperation as exc:
        raise ValueError(f"{where}: field {key!r} holds the unreadable number {text!r}") from exc
    if not number.is_finite():
        raise ValueError(f"{where}: field {key!r} must be a finite number, got {text}")
    if number.is_zero():
        return "0"
    digits = max(number.adjusted() + 1, 0) + max(-number.as_tuple().exponent, 0)  # type: ignore[operator]
    if digits > MAX_NUMBER_DIGITS:
        raise ValueError(f"{where}: field {key!r} holds {text[:40]!r}, which takes more than {MAX_NUMBER_DIGITS} "
                         "digits to write exactly; give the answer as a string")
    out = format(number, "f")
    return out.rstrip("0").rstrip(".") if "." in out else out


@dataclass(frozen=True)
class Problem:
    """One problem: the raw question text (no template), the reference answer and the other fields."""

    prompt_text: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


class EmptyAnswerError(ValueError):
    """An answer (or a list element of one) that is empty or whitespace; the message names the file and line.

    Callers that offer a way to skip such rows name it after the message (``dsrl-fast train``: data.empty_answers).
    """


def _answer_text(value: Any, mode: AnswerMode, where: str, key: str) -> str:
    if isinstance(value, _JsonNumber):
        value = value.text if mode == "boxed" else value
    if mode == "boxed":
        boxed = extract_boxed(value) if isinstance(value, str) else None
        if boxed is None:
            raise ValueError(f"{where}: field {key!r} has no complete \\boxed{{}} answer")
        return boxed
    if mode == "list":
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as exc:
                raise ValueError(f"{where}: field {key!r} is not a list literal: {value!r}") from exc
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{where}: field {key!r} must be a non-empty list, got {value!r}")
        return ", ".join(_answer_text(v, "field", where, key) for v in value)
    if isinstance(value, _JsonNumber):
        return _exact_decimal(value.text, where, key)
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list, tuple)):
        raise ValueError(f"{where}: field {key!r} must be a string or a number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: field {key!r} must be a finite number, got {value!r}")
        return _exact_decimal(repr(value), where, key)
    if isinstance(value, int):
        return str(value)
    if not str(value).strip():
        raise EmptyAnswerError(f"{where}: field {key!r} is an empty answer ({value!r}); fix the row")
    return str(value).strip()


def _to_problems(
    rows: Iterable[tuple[str, Mapping[str, Any]]],
    source: str,
    problem_key: str,
    answer_key: str,
    answer_mode: AnswerMode,
    empty_answers: EmptyAnswers = "error",
) -> list[Problem]:
    if answer_mode not in ANSWER_MODES:
        raise ValueError(f"answer_mode must be one of {ANSWER_MODES}, got {answer_mode!r}")
    if empty_answers not in EMPTY_ANSWERS:
        raise ValueError(f"empty_answers must be one of {EMPTY_ANSWERS}, got {empty_answers!r}")
    problems = []
    skipped = 0
    for where, row in rows:
        for key in (problem_key, answer_key):
            if key not in row:
                raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(row)})")
        prompt = row[problem_key]
        if not isinstance(prompt, str) or not prompt.strip():
            shown = prompt.text if isinstance(prompt, _JsonNumber) else prompt
            raise ValueError(f"{where}: field {problem_key!r} must be a non-empty string, got {shown!r}")
        try:
            answer = _answer_text(row[answer_key], answer_mode, where, answer_key)
        except EmptyAnswerError:
            if empty_answers == "error":
                raise
            skipped += 1
            continue
        try:
            meta = {k: _plain_numbers(v) for k, v in row.items() if k not in (problem_key, answer_key)}
        except ValueError as exc:  # an integer past Python's digit limit
            raise ValueError(f"{where}: {exc}") from exc
        problems.append(Problem(prompt, answer, meta))
    if skipped:
        logger.warning("%s: skipped %d rows with an empty answer in field %r", source, skipped, answer_key)
    if not problems:
        raise ValueError(f"{source} holds no problems")
    return problems


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}, line {line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}, column {exc.start + 1}: not UTF-8 (byte {raw[exc.start]:#04x}: "
                                 f"{exc.reason}); re-encode the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_float=_JsonNumber, parse_int=_JsonNumber, parse_constant=_JsonNumber)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}, row {i}", row


def load_problems(
    path: str | Path,
    problem_key: str = "problem",
    answer_key: str = "answer",
    answer_mode: AnswerMode = "field",
    limit: int | None = None,
    empty_answers: EmptyAnswers = "error",
) -> list[Problem]:
    """Problems from a ``.jsonl`` or ``.parquet`` file; the first ``limit`` if given.

    Raises FileNotFoundError for a missing file and ValueError for an empty file, a row that lacks a field
    (naming the field, the line and the fields present), bytes that are not UTF-8, or an answer that is not
    exact text (see the module docstring). ``empty_answers="skip"`` skips rows whose answer is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not a file")
    if path.suffix == ".jsonl":
        rows: Iterator[tuple[str, Mapping[str, Any]]] = _jsonl_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise ValueError(f"path must end in .jsonl or .parquet, got {str(path)!r}")
    return _to_problems(_take(rows, limit), str(path), problem_key, answer_key, answer_mode, empty_answers)


def load_hf_problems(
    name: str,
    split: str = "train",
    config: str | None = None,
    problem_key: str = "problem",
    answer_key: str = "answer",
    answer_mode: AnswerMode = "field",
    limit: int | None = None,
    empty_answers: EmptyAnswers = "error",
) -> list[Problem]:
    """Problems from a Hugging Face dataset (``datasets.load_dataset(name, config, split=split)``)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"loading the Hugging Face dataset {name!r} needs `datasets`: pip install datasets") from exc
    table = datasets.load_dataset(name, config, split=split)
    rows = ((f"{name}[{split}], row {i}", row) for i, row in enumerate(table))
    return _to_problems(_take(rows, limit), f"{name}[{split}]", problem_key, answer_key, answer_mode, empty_answers)


_Rows = Iterator[tuple[str, Mapping[str, Any]]]


def _take(rows: _Rows, limit: int | None) -> _Rows:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


class PromptSampler:
    """Endless batches of problem indices, reshuffled every epoch, resumable from a state dict.

    Epoch ``e`` visits ``range(n)`` in the order of a permutation seeded by ``(seed, e)``. A
    batch that runs past the end of an epoch is completed from the next one, so every batch
    holds ``batch_size`` indices; with ``drop_last`` an epoch ends after its ``n // batch_size``
    full batches instead and its remaining indices are skipped (a PyTorch DataLoader's
    ``drop_last``). ``state_dict()`` after k batches, loaded into a fresh sampler, continues with
    batch k + 1.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = False):
        for name, value in (("n", n), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size must be <= n={n} with drop_last (an epoch holds no full batch), "
                             f"got {batch_size}")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` problem indices."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), self.n - self.position)
            batch.extend(self._order[self.position : self.position + take].tolist())
            self.position += take
            if self.position == self.n or self.drop_last and self.n - self.position < self.batch_size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume: ``n``, ``batch_size``, ``seed``, ``epoch``, ``position``."""
        keys = ("n", "batch_size", "seed", "epoch", "position")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume from :meth:`state_dict`; ``n`` and ``seed`` must match this sampler's (``batch_size`` may differ)."""
        for key in ("n", "seed"):
            if state.get(key) != getattr(self, key):
                expected = getattr(self, key)
                raise ValueError(f"state[{key!r}] must equal this sampler's {key}={expected}, got {state.get(key)!r}")
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(position, int) or not 0 <= position < self.n:
            raise ValueError(f"state must hold epoch >= 0 and 0 <= position < {self.n}, got {epoch!r}, {position!r}")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)
