"""A checker whose fork server cannot start: a fork server (a ``python -c`` process, as multiprocessing starts it)
that imports this module exits at once. A stand-in for a server that dies at every start (an OOM killer, a broken
environment); any other process imports it as a plain module."""

from __future__ import annotations

import os
import sys

if sys.argv == ["-c"]:
    os._exit(3)


def equal_check(answer: str, reference: str) -> bool:
    return answer == reference
