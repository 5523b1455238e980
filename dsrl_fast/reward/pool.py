"""Worker processes that run ``check(answer, reference) -> bool`` under a hard per-check time limit.

Why our own pool and not ``pebble.ProcessPool`` (5.2, read for this choice): pebble's workers take tasks from one
shared channel under a process lock, so a worker killed while holding it (at the wrong moment, or by the OOM
killer) wedges the pool, and its timeouts are only enforced when that lock is free; a failing initializer makes it
respawn workers forever, and it has no start-up time limit. Closing those gaps on top of pebble would take about
as much code as this module, which gives each worker its own pipe, so a dead worker affects only its own check.

Guarantees (each tested, under CPU load where it matters):

- **Time limit.** A check's clock starts when it is sent to a started worker; at ``timeout_s`` the worker is
  killed (SIGKILL, whatever it is doing) and the check's outcome is TIMEOUT. A replacement starts at once.
- **Dead workers.** Workers are checked before each dispatch: one that died while idle is replaced and never
  receives a check. A worker that dies *during* a check gets the check retried once on a fresh worker; a second
  crash makes it ERROR.
- **Start-up.** A worker that fails to start (its warm-up check raised, it exited, or it did not report ready
  within ``start_timeout_s``) is replaced, with a logged warning. After ``max_start_failures`` failures in a row
  within one :meth:`CheckPool.run` call, ``run`` raises RuntimeError naming the cause: a checker that cannot start
  would score every answer 0.0 and silently turn every sample into a negative, so the run stops instead.
- **Fork server.** A fork server that died (killed, OOM) is restarted: a worker start that fails on its way
  through the server (``BrokenPipeError``, ``EOFError``: the server died under the request) is retried up to
  ``_SERVER_TRIES`` times, and multiprocessing starts a new server once it sees the old one gone. Only a server
  that cannot be started again makes :meth:`CheckPool.run` raise RuntimeError, in one line naming the cause.
  Checks whose answer arrived while the pool was busy restarting the server are read, never timed out.
- A call's total time is bounded by its checks' limits plus worker start-ups (``start_timeout_s`` each).

Workers start from a fork server by default (``mp_context="forkserver"`` where the platform has it): the server
imports the check's module and ``preload`` once (torch through ``dsrl_fast``, sympy through math-verify: seconds),
then each worker, including every replacement after a timeout or a crash, is a fork of it ready in milliseconds
instead of re-importing everything. The preload list is process-wide and takes effect when the server first starts.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Literal

from dsrl_fast.reward.base import MalformedAnswer, Outcome

__all__ = ["DEFAULT_START_METHOD", "CheckPool", "StartMethod"]

logger = logging.getLogger(__name__)

StartMethod = Literal["spawn", "forkserver", "fork"]
DEFAULT_START_METHOD: StartMethod = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
_SERVER_TRIES = 5  # worker starts through a dead fork server before giving up (a new server is up by the 2nd)


def _worker_main(conn: Connection, check: Callable[[str, str], bool], warm_up: Sequence[tuple[str, str]]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns shutdown on Ctrl-C
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        for answer, reference in warm_up:  # lazy imports and caches filled before the first timed check
            check(answer, reference)
    except Exception as exc:  # reported to the parent, which retries and then raises
        conn.send(("start_error", f"{type(exc).__name__}: {exc}"))
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
            outcome = Outcome.CORRECT if check(answer, reference) else Outcome.WRONG
        except MalformedAnswer:
            outcome = Outcome.NO_ANSWER
        except Exception:  # a check that cannot compare its input: counted as a reward error
            outcome = Outcome.ERROR
        conn.send((index, int(outcome)))


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, check: Callable[[str, str], bool],
                 warm_up: Sequence[tuple[str, str]], start_timeout_s: float):
        self.conn, child = ctx.Pipe()
        process_cls = ctx.Process  # type: ignore[attr-defined]  # every concrete context defines it
        self.process = process_cls(target=_worker_main, args=(child, check, warm_up), daemon=True)
        try:
            self.process.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()
        self.ready = False
        self.task: int | None = None
        self.sent_at = 0.0
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


class _Call:
    """The state of one :meth:`CheckPool.run`."""

    def __init__(self, n: int):
        self.todo = deque(range(n))
        self.outcomes: list[Outcome | None] = [None] * n
        self.seconds = [0.0] * n
        self.crashed: set[int] = set()
        self.start_failures = 0


class CheckPool:
    """Worker processes running ``check(answer, reference) -> bool`` with a per-check time limit.

    Args:
        check: module-level (picklable) function; it may raise MalformedAnswer (outcome NO_ANSWER) or any other
            exception (ERROR).
        num_workers: worker processes, started on first use.
        timeout_s: time limit of one check, from its dispatch to a started worker.
        start_timeout_s: time limit of one worker's start-up (spawn, imports, warm-up check).
        max_start_failures: start failures in a row within one call before :meth:`run` raises RuntimeError.
        mp_context: multiprocessing start method.
        preload: modules the fork server imports besides ``check``'s own (``mp_context="forkserver"`` only).
        warm_up: ``(answer, reference)`` pairs each worker checks before it reports ready (part of its start-up,
            not of any check's time limit); one that raises is a start failure.

    :meth:`run` is thread-safe (calls are serialized). :meth:`close` (also run at garbage collection and
    interpreter exit) stops every worker.
    """

    def __init__(
        self,
        check: Callable[[str, str], bool],
        num_workers: int,
        timeout_s: float,
        start_timeout_s: float = 120.0,
        max_start_failures: int = 3,
        mp_context: StartMethod = DEFAULT_START_METHOD,
        preload: Sequence[str] = (),
        warm_up: Sequence[tuple[str, str]] = (("0", "0"),),
    ):
        if not callable(check):
            raise TypeError(f"check must be callable, got {type(check).__name__}")
        for name, value in (("num_workers", num_workers), ("max_start_failures", max_start_failures)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        self._check = check
        self._num_workers = num_workers
        self._timeout_s = float(timeout_s)
        self._start_timeout_s = float(start_timeout_s)
        self._max_start_failures = max_start_failures
        self._warm_up = tuple((str(a), str(r)) for a, r in warm_up)
        self._ctx = mp.get_context(mp_context)
        if mp_context == "forkserver":
            module = getattr(getattr(check, "func", check), "__module__", None)  # a functools.partial's function
            self._ctx.set_forkserver_preload([*([module] if module else []), *preload])  # type: ignore[attr-defined]
        self._workers: list[_Worker] = []
        self.last_check_seconds: list[float] = []
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    @property
    def timeout_s(self) -> float:
        """The time limit of one check in seconds."""
        return self._timeout_s

    @property
    def processes(self) -> list[mp.process.BaseProcess]:
        """The current worker processes (for monitoring and tests)."""
        return [w.process for w in self._workers]

    def close(self) -> None:
        """Stop all workers; later :meth:`run` calls raise RuntimeError."""
        with self._lock:
            self._finalizer()

    def warm_up(self) -> None:
        """Start the missing workers and wait until every worker is ready (start failures as in :meth:`run`)."""
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("CheckPool is closed")
            while len(self._workers) < self._num_workers:
                self._workers.append(self._spawn())
            call = _Call(0)
            try:
                while not all(w.ready for w in self._workers):
                    self._collect(call)
            except BaseException:
                _stop_all(self._workers)
                raise

    def run(self, pairs: list[tuple[str, str]]) -> list[Outcome]:
        """The :class:`~dsrl_fast.reward.base.Outcome` of ``check`` on each ``(answer, reference)`` pair."""
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("CheckPool is closed")
            while len(self._workers) < self._num_workers:
                self._workers.append(self._spawn())
            call = _Call(len(pairs))
            try:
                while call.todo or any(w.task is not None for w in self._workers):
                    self._dispatch(pairs, call)
                    self._collect(call)
            except BaseException:  # workers may hold stale tasks: start afresh next time
                _stop_all(self._workers)
                raise
            assert all(o is not None for o in call.outcomes)
            self.last_check_seconds = call.seconds
            return [o for o in call.outcomes if o is not None]

    def _spawn(self) -> _Worker:
        for attempt in range(1, _SERVER_TRIES + 1):
            try:
                return _Worker(self._ctx, self._check, self._warm_up, self._start_timeout_s)
            except (OSError, EOFError) as exc:  # the fork server died under the request
                cause = f"{type(exc).__name__}: {exc}"
                logger.warning("reward check worker could not be started (%s); attempt %d of %d", cause, attempt,
                               _SERVER_TRIES)
                time.sleep(0.05 * attempt)  # multiprocessing restarts a server it has seen exit
        raise RuntimeError(f"reward check workers cannot be started: {_SERVER_TRIES} tries through the "
                           f"{self._ctx.get_start_method()!r} start method failed; last cause: {cause}")

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        self._workers[self._workers.index(worker)] = self._spawn()

    def _dispatch(self, pairs: list[tuple[str, str]], call: _Call) -> None:
        for worker in list(self._workers):
            if not (worker.ready and worker.task is None and call.todo):
                continue
            if not worker.process.is_alive():
                logger.warning("reward check worker %d died while idle (exit code %s); replacing it",
                               worker.process.pid, worker.process.exitcode)
                self._replace(worker)
                continue
            index = call.todo.popleft()
            try:
                worker.conn.send((index, *pairs[index]))
            except OSError:  # it died between the liveness check and the send: the check goes to another worker
                call.todo.appendleft(index)
                self._replace(worker)
                continue
            worker.task = index
            worker.sent_at = time.monotonic()
            worker.deadline = worker.sent_at + self._timeout_s

    def _start_failed(self, worker: _Worker, call: _Call, reason: str) -> None:
        call.start_failures += 1
        logger.warning("reward check worker failed to start (%s); attempt %d of %d", reason, call.start_failures,
                       self._max_start_failures)
        self._replace(worker)
        if call.start_failures >= self._max_start_failures:
            raise RuntimeError(
                f"reward check workers failed to start {call.start_failures} times in a row; last cause: {reason}. "
                "With the 'spawn' and 'forkserver' start methods the calling script must guard its entry point with "
                "`if __name__ == '__main__':`"
            )

    def _crashed(self, worker: _Worker, call: _Call) -> None:
        index = worker.task
        assert index is not None
        code = worker.process.exitcode
        self._replace(worker)
        if index in call.crashed:
            logger.warning("reward check %d crashed its worker twice (exit code %s); it scores 0.0", index, code)
            call.outcomes[index] = Outcome.ERROR
        else:
            call.crashed.add(index)
            call.todo.appendleft(index)

    def _collect(self, call: _Call) -> None:
        waiting = [w for w in self._workers if w.task is not None or not w.ready]
        if not waiting:
            return
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        ready = wait([w.conn for w in waiting], timeout=timeout)
        for worker in (w for w in waiting if w.conn in ready):
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.process.join(1.0)
                if worker.ready:
                    self._crashed(worker, call)
                else:
                    self._start_failed(worker, call, f"exited during start-up with code {worker.process.exitcode}")
                continue
            if message[0] == "start_error":
                self._start_failed(worker, call, message[1])
            elif message[0] == "ready":
                worker.ready = True
                call.start_failures = 0
            else:
                index, code = message
                assert index == worker.task
                call.outcomes[index] = Outcome(code)
                call.seconds[index] = time.monotonic() - worker.sent_at
                worker.task = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.deadline > now or worker.conn.poll():  # an answer (or EOF) waiting is read next round
                continue
            if worker.task is not None:
                worker.stop()  # SIGKILL
                call.seconds[worker.task] = time.monotonic() - worker.sent_at
                call.outcomes[worker.task] = Outcome.TIMEOUT
                self._workers[self._workers.index(worker)] = self._spawn()
            elif not worker.ready:
                self._start_failed(worker, call, f"not ready within start_timeout_s={self._start_timeout_s} s")
