"""Graceful stops: the first SIGINT/SIGTERM asks the run to stop at the next step boundary, a second aborts at once."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Self

from dsrl_fast.errors import RunAborted

__all__ = ["StopRequest"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere it never fires).

    `signum` is None until a first signal arrives; the trainer checks it after each step, saves a checkpoint and
    stops. A second signal raises :class:`~dsrl_fast.errors.RunAborted` wherever the run is.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is not None:
            raise RunAborted(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
              "(send it again to abort now)", file=sys.stderr, flush=True)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
