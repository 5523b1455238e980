"""Module-level helpers the reward tests send to worker processes (kept light: every worker imports this module).

Checks used by :class:`dsrl_fast.reward.CheckPool`; answers steer them: ``hang`` sleeps, ``crash`` kills the worker,
``crash_once`` kills it only the first time (a marker file in ``marker_dir``, bound with functools.partial: workers
fork from a server that does not see later environment changes), ``malformed`` raises MalformedAnswer, ``boom``
raises RuntimeError. The warm-up call of a worker is ``check("0", "0")``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dsrl_fast.reward.base import MalformedAnswer

NOT_CALLABLE = 3


def _first_time(marker_dir: str | None, name: str) -> bool:
    assert marker_dir is not None, "bind marker_dir with functools.partial"
    marker = Path(marker_dir) / name
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def sleepy_check(answer: str, reference: str, marker_dir: str | None = None) -> bool:
    if answer == "hang":
        time.sleep(600)
    if answer == "crash" or (answer == "crash_once" and _first_time(marker_dir, "crash_once")):
        os._exit(3)
    if answer == "malformed":
        raise MalformedAnswer("cannot read it")
    if answer == "boom":
        raise RuntimeError("checker bug")
    return answer == reference or answer == "crash_once"


def broken_check(answer: str, reference: str) -> bool:
    raise ImportError("no checker backend")


def stuck_start_check(answer: str, reference: str) -> bool:
    if (answer, reference) == ("0", "0"):
        time.sleep(600)
    return answer == reference


def flaky_start_check(answer: str, reference: str, marker_dir: str | None = None) -> bool:
    """Stuck in its first worker's warm-up only."""
    if (answer, reference) == ("0", "0") and _first_time(marker_dir, "start"):
        time.sleep(600)
    return answer == reference


def never_check(answer: str, reference: str) -> bool:
    return False


def burn() -> None:
    """Busy-loop forever (a CPU load for timing tests)."""
    x = 0
    while True:
        x = (x * 1_103_515_245 + 12_345) % 2**31


def constant_reward(responses: list[str], references: list[str]) -> list[float]:
    return [0.5] * len(responses)


def bad_length_reward(responses: list[str], references: list[str]) -> list[float]:
    return [1.0]


def nan_reward(responses: list[str], references: list[str]) -> list[float]:
    return [float("nan")] * len(responses)
