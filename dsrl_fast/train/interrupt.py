"""Graceful stops: the first SIGINT/SIGTERM asks the run to stop at the next step boundary, a second aborts at once.

Work with nothing to save at a boundary (evaluation: its finished batches are already on disk) passes `stop_now`:
every signal then stops it at once, except inside a :meth:`StopRequest.deferred` block (a cache write), which ends
first.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Self

from dsrl_fast.errors import RunAborted, RunStopped

__all__ = ["StopRequest"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere it never fires).

    `signum` is None until a first signal arrives; the trainer checks it after each step, saves a checkpoint and
    stops. A second signal raises :class:`~dsrl_fast.errors.RunAborted` wherever the run is.

    Args:
        stop_now: None (training: the behaviour above), or the exception every signal raises at once, built from the
            signal number; a signal inside :meth:`deferred` only sets `signum`, and the block raises on its way out.
    """

    def __init__(self, stop_now: Callable[[int], RunStopped] | None = None) -> None:
        self.signum: int | None = None
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
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
              "(send it again to abort now)", file=sys.stderr, flush=True)

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
