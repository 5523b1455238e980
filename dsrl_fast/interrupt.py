"""Graceful stops: the first SIGINT/SIGTERM asks the run to stop at its next check point, a second aborts at once.

Training checks at points every rank reaches in the same order (:meth:`StopRequest.check`, one scalar all-reduce when
distributed) and raises :class:`Stopping` there; the trainer decides what is saved. Long phases reach a check point
within a bounded time: rank-local work (the supervised warm-up, Hugging Face generation) watches
:attr:`StopRequest.requested` and ends early, and the check right after it makes every rank agree; the update checks
before its micro-batches through :class:`MicroBatchStops`, which votes across ranks only every ~VOTE_EVERY_S seconds of
update work.

Work with nothing to save at a boundary (evaluation: its finished batches are already on disk) passes `stop_now`:
every signal then stops it at once, except inside a :meth:`StopRequest.deferred` block (a cache write), which ends
first.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Self

import torch.distributed as dist

from dsrl_fast.errors import RunAborted, RunStopped
from dsrl_fast.distributed import is_distributed, reduce_floats

__all__ = ["VOTE_EVERY_S", "MicroBatchStops", "StopRequest", "Stopping"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Distributed updates vote on a stop about this often (in seconds of update work): a few scalar all-reduces per
# minute instead of one per micro-batch.
VOTE_EVERY_S = 5.0


class Stopping(BaseException):
    """Every rank agreed, at a check point, to stop on signal `signum` (a BaseException: `except Exception` in library
    code between the check point and the trainer cannot swallow it)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stop requested by {signal.Signals(signum).name}")


def _vote(signum: int | None, *extra: float) -> tuple[int, list[float]]:
    """The largest signal number any rank received (0: none) and the ranks' maximum of each of `extra`."""
    values = reduce_floats([float(signum or 0), *extra], dist.ReduceOp.MAX) if is_distributed() else \
        [float(signum or 0), *extra]
    return int(values[0]), values[1:]


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere it never fires).

    `signum` is None until a first signal arrives; the trainer's check points (:meth:`check`) then raise
    :class:`Stopping` and it saves what it can. A second signal raises :class:`~dsrl_fast.errors.RunAborted` wherever
    the run is. `action` ends the message a first signal prints (what the run is about to do).

    Args:
        stop_now: None (training: the behaviour above), or the exception every signal raises at once, built from the
            signal number; a signal inside :meth:`deferred` only sets `signum`, and the block raises on its way out.
    """

    def __init__(self, stop_now: Callable[[int], RunStopped] | None = None) -> None:
        self.signum: int | None = None
        self.action = "saving a checkpoint after this step"
        self._stop_now = stop_now
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self._stop_now is not None:
            first = self.signum is None
            self.signum = self.signum or signum
            if not (first and self._deferring):
                raise self._stop_now(self.signum)
            return
        if self.signum is not None:
            raise RunAborted(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: {self.action} (send it again to abort now)",
              file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        """True once this process received a first signal (rank-local: for work without collectives)."""
        return self.signum is not None

    def check(self) -> None:
        """A check point every rank reaches in the same order: raise :class:`Stopping` when any rank received a
        signal (one scalar all-reduce when distributed, a flag read otherwise)."""
        signum, _ = _vote(self.signum)
        if signum:
            raise Stopping(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block a first signal does not cut (with `stop_now`): the stop is raised when the block ends."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._stop_now is not None and self.signum is not None:
            raise self._stop_now(self.signum)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class MicroBatchStops:
    """Stop checks before each micro-batch of a training step, until the step's first optimizer step.

    The updaters call :meth:`before_micro_batch` and :meth:`after_optimizer_step`; the trainer calls :meth:`arm` at
    the start of every step (on every rank). Until an optimizer step has run, abandoning the step loses nothing: the
    weights and optimizer states are those of the previous step. After it, the step runs to its end.

    One process checks the flag before every micro-batch. Distributed, the ranks vote at micro-batch 0 and then at
    micro-batches spaced by about :data:`VOTE_EVERY_S` seconds of the slowest rank's micro-batch time: every rank
    computes the same spacing from the same vote, so the votes line up without a collective per micro-batch.
    """

    def __init__(self, request: StopRequest):
        self.request = request
        self.armed = False
        self._calls = self._next_vote = self._previous_vote = 0
        self._since = time.monotonic()

    def arm(self) -> None:
        """A new training step begins: checks are on again."""
        self.armed = True
        self._calls = self._next_vote = self._previous_vote = 0
        self._since = time.monotonic()

    def before_micro_batch(self) -> None:
        """Raise :class:`Stopping` when the ranks agree to stop (only while armed)."""
        if not self.armed:
            return
        calls = self._calls
        self._calls += 1
        if not is_distributed():
            if self.request.signum is not None:
                raise Stopping(self.request.signum)
            return
        if calls < self._next_vote:
            return
        now = time.monotonic()
        seconds_per_call = (now - self._since) / max(calls - self._previous_vote, 1) if calls else 0.0
        signum, (slowest,) = _vote(self.request.signum, seconds_per_call)
        if signum:
            raise Stopping(signum)
        self._previous_vote, self._since = calls, now
        self._next_vote = calls + max(1, int(VOTE_EVERY_S / slowest)) if slowest > 0 else calls + 1

    def after_optimizer_step(self) -> None:
        """The step changed the weights: it runs to its end."""
        self.armed = False
