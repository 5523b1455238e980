"""Verifiable math rewards: the last ``\\boxed{...}`` of a response checked against a reference.

A reward function maps ``(responses, references)`` to one float per response: 1.0 when the
response's final boxed answer matches its reference, else 0.0. Missing or malformed answers
score 0.0 and never raise.

``math_verify`` checks run in worker processes with a per-check time limit: math-verify's own
timeouts use SIGALRM (main thread only), so they are disabled and a check that runs past the
limit has its worker killed and scores 0.0. This works from any thread. Answers that equal the
reference after light normalization score 1.0 without starting sympy at all.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Literal, Protocol

__all__ = [
    "CheckPool",
    "MathVerifyReward",
    "RewardFn",
    "answers_match_fast",
    "exact_match_reward",
    "extract_boxed",
    "get_reward_fn",
    "math_verify_check",
    "normalize_answer",
    "register_reward_fn",
]


class RewardFn(Protocol):
    """``(responses, references) -> scores``: one float per response, same order."""

    def __call__(self, responses: list[str], references: list[str]) -> list[float]: ...


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_SPACING_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])|\\[!,;: ]")
_DECIMAL_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``.

    Nested and escaped braces (``\\{``, ``\\}``) are handled. The brace-less form ``\\boxed x``
    takes the rest of the line up to the next ``$``. Returns None when there is no box, the
    last box is unbalanced (e.g. a truncated response) or empty.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ends = [m.end() for m in _BOX_RE.finditer(text)]
    if not ends:
        return None
    start = ends[-1]
    while start < len(text) and text[start] in " \t":
        start += 1
    if start < len(text) and text[start] == "{":
        depth = 0
        i = start
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start + 1 : i].strip() or None
            i += 1
        return None
    return re.split(r"[$\n]", text[start:], maxsplit=1)[0].strip() or None


def normalize_answer(answer: str) -> str:
    """Light, meaning-preserving normalization: no ``$``, spacing commands or whitespace;
    ``\\dfrac``/``\\tfrac`` become ``\\frac``; a trailing period is dropped."""
    s = _UNESCAPED_DOLLAR_RE.sub("", answer)
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return "".join(s.split()).rstrip(".")


def answers_match_fast(answer: str, reference: str) -> bool:
    """Equal after :func:`normalize_answer`, or equal plain decimals (``27`` vs ``27.0``)."""
    a, r = normalize_answer(answer), normalize_answer(reference)
    if a == r:
        return bool(a)
    if _DECIMAL_RE.fullmatch(a) and _DECIMAL_RE.fullmatch(r):
        return float(a) == float(r)
    return False


def _check_batch(responses: list[str], references: list[str]) -> None:
    for name, value in (("responses", responses), ("references", references)):
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise TypeError(f"{name} must be a list of str, got {type(value).__name__}")
    if len(responses) != len(references):
        raise ValueError(
            f"responses and references must have the same length, got {len(responses)} and {len(references)}"
        )


def exact_match_reward(responses: list[str], references: list[str]) -> list[float]:
    """1.0 where the last boxed answer matches the reference by :func:`answers_match_fast`."""
    _check_batch(responses, references)
    scores = []
    for response, reference in zip(responses, references, strict=True):
        answer = extract_boxed(response)
        scores.append(float(answer is not None and answers_match_fast(answer, reference)))
    return scores


def math_verify_check(answer: str, reference: str) -> bool:
    """math-verify equivalence of two answer strings, with its signal-based timeouts off."""
    from math_verify import parse, verify

    def boxed(s: str) -> str:
        return "\\boxed{" + _UNESCAPED_DOLLAR_RE.sub("", s) + "}"

    gold = parse(boxed(reference), parsing_timeout=None)
    pred = parse(boxed(answer), parsing_timeout=None)
    return bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)


def _worker_main(conn: Connection, check: Callable[[str, str], bool]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns shutdown on Ctrl-C
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        check("0", "0")  # import and warm up before the first timed check
    except Exception as exc:  # reported to the caller, which raises
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, answer, reference = task
        try:
            ok = bool(check(answer, reference))
        except Exception:  # a check that cannot parse or compare its input scores 0 by definition
            ok = False
        conn.send((index, ok))


_MAX_START_FAILURES = 3


StartMethod = Literal["spawn", "forkserver", "fork"]


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, check: Callable[[str, str], bool], start_timeout_s: float):
        self.conn, child = ctx.Pipe()
        process_cls = ctx.Process  # type: ignore[attr-defined]  # every concrete context defines it
        self.process = process_cls(target=_worker_main, args=(child, check), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task: int | None = None
        self.deadline = time.monotonic() + start_timeout_s

    def stop(self, wait_s: float = 0.0) -> None:
        if wait_s > 0 and self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(wait_s)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop(wait_s=1.0)
    workers.clear()


class CheckPool:
    """Worker processes running ``check(answer, reference) -> bool`` with a per-check time limit.

    Workers start on first use and are restarted after a timeout or a crash (that check gives
    False). ``check`` must be picklable (a module-level function). :meth:`run` is thread-safe;
    calls are serialized. :meth:`close` (also run at garbage collection and interpreter exit)
    stops every worker.
    """

    def __init__(
        self,
        check: Callable[[str, str], bool],
        num_workers: int,
        timeout_s: float,
        start_timeout_s: float = 120.0,
        mp_context: StartMethod = "spawn",
    ):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self._check = check
        self._num_workers = num_workers
        self._timeout_s = float(timeout_s)
        self._start_timeout_s = float(start_timeout_s)
        self._ctx = mp.get_context(mp_context)
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    @property
    def processes(self) -> list[mp.process.BaseProcess]:
        """The live worker processes (for monitoring)."""
        return [w.process for w in self._workers]

    def close(self) -> None:
        """Stop all workers; later :meth:`run` calls raise RuntimeError."""
        with self._lock:
            self._finalizer()

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._check, self._start_timeout_s)

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        self._workers[self._workers.index(worker)] = self._spawn()

    def run(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """``check`` on each ``(answer, reference)`` pair; False where it timed out or crashed."""
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("CheckPool is closed")
            while len(self._workers) < self._num_workers:
                self._workers.append(self._spawn())
            results = [False] * len(pairs)
            todo = deque(range(len(pairs)))
            try:
                while todo or any(w.task is not None for w in self._workers):
                    self._dispatch(pairs, todo)
                    self._collect(results)
            except BaseException:  # workers may hold stale tasks: start afresh next time
                _stop_all(self._workers)
                raise
            return results

    def _dispatch(self, pairs: list[tuple[str, str]], todo: deque[int]) -> None:
        for worker in list(self._workers):
            if worker.ready and worker.task is None and todo:
                index = todo.popleft()
                try:
                    worker.conn.send((index, *pairs[index]))
                except OSError:  # the idle worker died; retry the task on its replacement
                    todo.appendleft(index)
                    self._replace(worker)
                    continue
                worker.task = index
                worker.deadline = time.monotonic() + self._timeout_s

    def _start_failed(self, worker: _Worker) -> None:
        worker.process.join(5.0)
        self._start_failures += 1
        if self._start_failures >= _MAX_START_FAILURES:
            raise RuntimeError(
                f"reward check worker exited during start-up (exit code {worker.process.exitcode}, "
                f"{self._start_failures} times in a row); with the 'spawn' start method the calling script "
                "must guard its entry point with `if __name__ == '__main__':`"
            )

    def _collect(self, results: list[bool]) -> None:
        waiting = [w for w in self._workers if w.task is not None or not w.ready]
        assert waiting, "no worker is busy or starting"
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        ready = wait([w.conn for w in waiting], timeout=timeout)
        for worker in (w for w in waiting if w.conn in ready):
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                if not worker.ready:
                    self._start_failed(worker)
                self._replace(worker)  # crashed mid-check (that check scores False) or retrying start-up
                continue
            if message[0] == "error":
                raise RuntimeError(f"reward check worker failed to start: {message[1]}")
            if message[0] == "ready":
                worker.ready = True
                self._start_failures = 0
            else:
                index, ok = message
                assert index == worker.task
                results[index] = ok
                worker.task = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.deadline <= now and worker.task is not None:
                self._replace(worker)
            elif worker.deadline <= now and not worker.ready:
                raise RuntimeError(f"reward check worker did not start within {self._start_timeout_s} s")


class MathVerifyReward:
    """Reward 1.0 when the last boxed answer is math-verify-equivalent to the reference.

    Args:
        timeout_s: time limit of one check; a check past it scores 0.0.
        num_workers: worker processes (default ``min(4, cpu_count)``).
        fast_path: score answers that match by :func:`answers_match_fast` without sympy.
        check: the equivalence test run in the workers (module-level, picklable).
        mp_context: multiprocessing start method for the workers.

    Identical ``(answer, reference)`` pairs in a batch are checked once. Use as a context
    manager or call :meth:`close` to stop the workers early.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int | None = None,
        fast_path: bool = True,
        check: Callable[[str, str], bool] = math_verify_check,
        mp_context: StartMethod = "spawn",
    ):
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.fast_path = fast_path
        self.pool = CheckPool(check, workers, timeout_s, mp_context=mp_context)

    def __call__(self, responses: list[str], references: list[str]) -> list[float]:
        _check_batch(responses, references)
        scores = [0.0] * len(responses)
        pending: dict[tuple[str, str], list[int]] = {}
        for i, (response, reference) in enumerate(zip(responses, references, strict=True)):
            answer = extract_boxed(response)
            if answer is None:
                continue
            if self.fast_path and answers_match_fast(answer, reference):
                scores[i] = 1.0
            else:
                pending.setdefault((answer, reference), []).append(i)
        if pending:
            for ok, indices in zip(self.pool.run(list(pending)), pending.values(), strict=True):
                for i in indices:
                    scores[i] = float(ok)
        return scores

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()

    def __enter__(self) -> MathVerifyReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "math_verify": MathVerifyReward,
    "exact_match": lambda: exact_match_reward,
}


def register_reward_fn(name: str, factory: Callable[..., RewardFn]) -> None:
    """Make ``get_reward_fn(name, **kwargs)`` return ``factory(**kwargs)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def get_reward_fn(name: str = "math_verify", **kwargs: object) -> RewardFn:
    """A reward function by registry name ("math_verify", "exact_match" or a registered one)."""
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name](**kwargs)
