"""Exceptions the command line reports as one line instead of a traceback.

- :class:`UserError`: bad input (config, data, output directory, a missing optional package) found before the heavy
  work starts; the CLI prints it and exits with status 2. It is a ``ValueError``.
- :class:`CheckpointWriteError`: a checkpoint could not be written (full disk, unwritable directory); the partial
  checkpoint is removed first. It is an ``OSError``.
- :class:`RunInterrupted`: the first SIGINT/SIGTERM stopped a run at a step boundary after a checkpoint was saved.
- :class:`RunAborted`: a second signal stopped it at once, without a checkpoint.

Both stops exit with 128 + the signal number, the shell's convention for a process ended by a signal. They derive
from ``BaseException``, like ``KeyboardInterrupt``, so a library's ``except Exception`` cannot swallow an abort.
"""

from __future__ import annotations

import signal

__all__ = ["CheckpointWriteError", "RunAborted", "RunInterrupted", "RunStopped", "UserError"]


class UserError(ValueError):
    """A mistake in what the user asked for; the message names the key, the expected and the received value."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the message names the directory, the cause and the free space left."""


class RunStopped(BaseException):
    """A run stopped on signal `signum`."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        """128 + the signal number."""
        return 128 + self.signum


class RunInterrupted(RunStopped):
    """A run stopped on a signal at a step boundary.

    Attributes:
        signum: the signal received (SIGINT or SIGTERM).
        steps_done: finished steps (the checkpoint's step, when one was saved).
        checkpoint: the checkpoint saved before stopping, or None (no step had finished).
    """

    def __init__(self, signum: int, steps_done: int, checkpoint: str | None):
        self.steps_done, self.checkpoint = steps_done, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no step had finished)"
        super().__init__(signum, f"stopped by {signal.Signals(signum).name} after {steps_done} steps; {where}; "
                                 "continue with resume=true")


class RunAborted(RunStopped):
    """A second signal aborted the run at once; steps since the last checkpoint are lost."""

    def __init__(self, signum: int):
        super().__init__(signum, f"aborted by a second {signal.Signals(signum).name}: steps since the last "
                                 "checkpoint are lost; resume=true continues from it")
