"""A toy reward that signals its own process on one chosen call, for tests that need a signal inside a given phase.

``exact_match_signalling`` scores like :func:`dsrl_fast.reward.exact_match_reward`. With ``DSRL_TEST_SIGNAL`` set to
``<call>:<SIGNAME>`` (e.g. ``1:SIGINT``) its ``<call>``-th call (1-based) sends that signal to the process with
``os.kill`` before it scores, and writes the wall time (``time.time()``) it sent it to ``DSRL_TEST_SIGNAL_LOG``.
In a training run call 1 scores the first evaluation, call 2 step 0's rollouts, call k+2 step k's (without periodic
evaluations). With ``DSRL_TEST_SIGNAL_RANK`` set only the process of that ``RANK`` signals itself (the others must
learn of the stop from it). Without ``DSRL_TEST_SIGNAL`` it only scores: the same reward for the interrupted run,
its resume and a reference run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from dsrl_fast.reward import exact_match_reward

_calls = 0


def exact_match_signalling(responses: list[str], references: list[str]) -> list[float]:
    global _calls
    _calls += 1
    spec = os.environ.get("DSRL_TEST_SIGNAL")
    only = os.environ.get("DSRL_TEST_SIGNAL_RANK")
    if spec and (only is None or only == os.environ.get("RANK", "0")):
        call, _, name = spec.partition(":")
        if _calls == int(call):
            Path(os.environ["DSRL_TEST_SIGNAL_LOG"]).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.Signals[name])
    return exact_match_reward(responses, references)
