"""A checker whose fork server cannot start: a fork server (``python -c "from multiprocessing.forkserver import
main; ..."``, as multiprocessing starts it) that imports this module exits at once. A stand-in for a server that dies
at every start (an OOM killer, a broken environment); any other process imports it as a plain module, including
other ``python -c`` processes such as pytest-xdist's workers (Linux: the command line is read from /proc)."""

from __future__ import annotations

import os
from pathlib import Path


def _is_fork_server() -> bool:
    try:
        return b"multiprocessing.forkserver" in Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return False


if _is_fork_server():
    os._exit(3)


def equal_check(answer: str, reference: str) -> bool:
    return answer == reference
