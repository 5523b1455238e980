"""The generation cache of one (model, benchmark) pair: a JSONL file an interrupted or repeated evaluation resumes from.

Layout: a header line ``{"format": ..., "settings": {...}, "model": <path>}`` (the settings: the model's content
digest from :mod:`dsrl_fast.eval.fingerprint`, the benchmark and every sampling setting), then one line per finished
problem: its index, question, responses, response token counts and whether each response ended on a stop token. Each
batch of problems is appended in one write, flushed and synced, as soon as it is generated.

What an existing file meets:

- same settings: its records are reused, each one checked first. A line cut short, garbage, not UTF-8, a missing or
  mistyped field, a response list of another length than n, a token count beyond the cap or a problem seen twice is
  reported (a warning naming the file, the line and the reason); the file is rewritten without those lines (the file
  as it was is kept as ``<file>.invalid``) and exactly the problems they held are generated again;
- only the model's digest differs (new weights written into the same directory), or the file predates content keys:
  the file is moved to ``stale/<benchmark>.<digest>.jsonl`` beside it, with a warning, and every problem is generated;
- other settings differ, the header is not a cache's, or a cached question differs from the data: refused with
  :class:`CacheMismatch` (one line), never mixed in.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsrl_fast.data.problems import Problem

__all__ = ["FORMAT", "CacheMismatch", "GenerationCache", "ProblemSamples"]

logger = logging.getLogger(__name__)

FORMAT = "dsrl_fast.eval.generations/2"
_UNKEYED_FORMAT = "dsrl_fast.eval.generations/1"  # keyed by the model's path: its model cannot be checked
_DIGEST = "model_digest"
_FIELDS = ("index", "problem", "responses", "num_tokens", "finished")
_MAX_WARNINGS = 10
_INDEX_HINT = re.compile(rb'\{"index": (\d+),')  # how append() starts every line


class CacheMismatch(ValueError):
    """An existing generation cache was made with other settings or questions, or is not a cache."""


@dataclass(frozen=True)
class ProblemSamples:
    """The n responses of one problem: decoded text, token count, and whether each ended on a stop token."""

    index: int
    problem: str
    responses: list[str]
    num_tokens: list[int]
    finished: list[bool]


def _short(digest: Any) -> str:
    """The first 16 hex digits of a "sha256:..." digest (a hub digest as it is, its "/" made a "_")."""
    text = str(digest)
    return text.removeprefix("sha256:")[:16] if text.startswith("sha256:") else text.replace("/", "_")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record_error(record: Any, n: int, max_tokens: int) -> str | None:
    """Why `record` is not a valid problem line for n samples of at most `max_tokens` tokens (None: it is)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    missing = [k for k in _FIELDS if k not in record]
    extra = sorted(set(record) - set(_FIELDS))
    if missing or extra:
        return f"missing fields {missing}" if missing else f"unexpected fields {extra}"
    if not _is_int(record["index"]) or record["index"] < 0:
        return f"index must be an int >= 0, got {record['index']!r}"
    if not isinstance(record["problem"], str):
        return f"problem must be a string, got {type(record['problem']).__name__}"
    for key, ok, kind in (("responses", lambda v: isinstance(v, str), "strings"),
                          ("num_tokens", lambda v: _is_int(v) and 0 <= v <= max_tokens, f"ints in [0, {max_tokens}]"),
                          ("finished", lambda v: isinstance(v, bool), "booleans")):
        values = record[key]
        if not isinstance(values, list) or not all(ok(v) for v in values):
            return f"{key} must be a list of {kind}"
        if len(values) != n:
            return f"{key} holds {len(values)} entries, the settings ask for n = {n}"
    return None


class GenerationCache:
    """Finished problems of one (model, benchmark) pair in `path` (see the module docstring for what is reused).

    Args:
        path: the JSONL file (created with its parent directories).
        settings: JSON-serializable values that decide the generations, with "model_digest", "n" and
            "max_new_tokens"; an existing file must hold the same.
        model: the model's path or hub id, recorded in the header (not compared: the digest is).

    Raises CacheMismatch (a ValueError) as described above.
    """

    def __init__(self, path: str | os.PathLike[str], settings: dict[str, Any], model: str):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))
        for key in (_DIGEST, "n", "max_new_tokens"):
            if key not in self.settings:
                raise ValueError(f"settings must hold {key!r}, got keys {sorted(self.settings)}")
        self.model = model
        self.done: dict[int, ProblemSamples] = {}
        if not self._load():
            self._start()

    def _start(self) -> None:
        """A new file holding only the header, written whole (a kill leaves the old file or the new one)."""
        header = {"format": FORMAT, "settings": self.settings, "model": self.model}
        self._replace_with([json.dumps(header).encode("utf-8")])

    def _replace_with(self, lines: list[bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        with tmp.open("wb") as f:
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _load(self) -> bool:
        """Read an existing file; False when there is none to reuse (absent, empty, header cut short, stale)."""
        if not self.path.is_file():
            return False
        data = self.path.read_bytes()
        if b"\n" not in data:
            if data:
                logger.warning("%s: the header line is cut short and no problem follows it: every problem is "
                               "generated", self.path)
            return False
        lines = data.split(b"\n")
        if not self._header_matches(lines[0]):
            return False
        tail = lines.pop()  # b"" when the file ends with a line end, else a line cut short
        bad: list[tuple[int, str, int | None]] = []  # (line number, reason, the problem it held)
        kept = [lines[0]]
        seen: dict[int, int] = {}
        for number, raw in enumerate(lines[1:], start=2):
            reason, record = self._parse(raw)
            index = record.get("index") if isinstance(record, dict) else None
            if not (_is_int(index) and index >= 0):
                index = None
            if index is None and (hint := _INDEX_HINT.match(raw)):
                index = int(hint[1])  # a damaged line still names its problem at its start (for the warning)
            if reason is None and index in seen:
                reason = f"problem {index} again (first on line {seen[index]})"
            if reason is not None:
                bad.append((number, reason, index))
                continue
            seen[index] = number
            self.done[index] = ProblemSamples(**record)
            kept.append(raw)
        if tail:
            hint = _INDEX_HINT.match(tail)
            bad.append((len(lines) + 1, "cut short (no line end: the write was interrupted)",
                        int(hint[1]) if hint else None))
        if bad:
            self._drop_invalid(bad, kept, seen)
        return True

    def _header_matches(self, raw: bytes) -> bool:
        """True when the header's settings are ours; False after moving a stale file aside; CacheMismatch otherwise."""
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            header = f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
        except json.JSONDecodeError as exc:
            header = f"not JSON ({exc.msg} at column {exc.colno})"
        fmt = header.get("format") if isinstance(header, dict) else None
        if fmt == _UNKEYED_FORMAT:
            self._move_stale("it was written before caches were keyed by the model's content, so its model cannot "
                             "be checked", "unkeyed")
            return False
        if fmt != FORMAT or not isinstance(header.get("settings"), dict):
            why = header if isinstance(header, str) else f"no {FORMAT} header"
            raise CacheMismatch(f"{self.path} line 1 is not a generation cache header ({why}); remove the file or "
                                f"choose another --output")
        old = header["settings"]
        changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        if changed == [_DIGEST]:
            self._move_stale(f"the model's files changed since it was written (digest {_short(old[_DIGEST])} -> "
                             f"{_short(self.settings[_DIGEST])})", _short(old[_DIGEST]))
            return False
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {self.settings.get(k)!r}" for k in changed if k != _DIGEST)
            raise CacheMismatch(f"{self.path} was generated with other settings ({diff}); choose another --output "
                                f"or remove the file to regenerate")
        return True

    def _move_stale(self, why: str, digest: str) -> None:
        stale = self.path.parent / "stale" / f"{self.path.stem}.{digest}.jsonl"
        stale.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, stale)
        logger.warning("%s: %s; every problem is generated again (the old generations are kept as %s)", self.path,
                       why, stale)

    def _parse(self, raw: bytes) -> tuple[str | None, Any]:
        """(why the line is invalid or None, its JSON value)."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})", None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"not JSON ({exc.msg} at column {exc.colno}: cut short or overwritten)", None
        return _record_error(record, self.settings["n"], self.settings["max_new_tokens"]), record

    def _drop_invalid(self, bad: list[tuple[int, str, int | None]], kept: list[bytes], seen: dict[int, int]) -> None:
        for number, reason, index in bad[:_MAX_WARNINGS]:
            if index is None:
                fate = "the problem it held is generated again"
            elif index in seen:
                fate = f"problem {index} is kept from line {seen[index]}"
            else:
                fate = f"problem {index} is generated again"
            logger.warning("%s line %d: %s; %s", self.path, number, reason, fate)
        if len(bad) > _MAX_WARNINGS:
            logger.warning("%s: %d more invalid lines", self.path, len(bad) - _MAX_WARNINGS)
        invalid = self.path.with_name(self.path.name + ".invalid")
        shutil.copyfile(self.path, invalid)
        self._replace_with(kept)  # a kill leaves the old file or the new one
        logger.warning("%s: rewritten with its %d valid problems; the file as it was is kept as %s", self.path,
                       len(self.done), invalid)

    def check_problems(self, problems: Sequence[Problem]) -> None:
        """Raise CacheMismatch when a cached problem's question differs from `problems` (the data changed).

        Cached problems beyond `problems` (a smaller limit) are kept and not used."""
        for index, cached in self.done.items():
            if index < len(problems) and problems[index].prompt_text != cached.problem:
                raise CacheMismatch(f"{self.path}: problem {index} differs from the cached question; the data changed "
                                    f"since the cache was written (choose another --output or remove the file)")

    def append(self, records: Sequence[ProblemSamples]) -> None:
        """Add finished problems: one write of their lines, flushed and synced."""
        lines = "".join(json.dumps(asdict(r)) + "\n" for r in records)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        for record in records:
            self.done[record.index] = record
