"""The run directory: one run at a time, never two runs mixed, checked writable before the heavy work, cleaned up
after.

A run directory holds ``config.yaml`` (and ``config.resume-<n>.yaml``, one per resume), ``metrics.jsonl``,
``samples.jsonl``, ``training.png``, ``summary.json``, ``checkpoints/``, ``tensorboard/``, ``wandb_run_id``,
``sft_warmup/`` (the toy model after its supervised warm-up), while a vLLM run is alive ``vllm_init/`` (the initial
weights vLLM loads), and while any run is alive ``run.lock``.

``run.lock`` holds its owner's pid, host and start time (JSON) and is held with an exclusive ``flock`` for the run's
lifetime. The kernel drops a flock when its process dies, however it dies, so a lock file whose flock is free was left
by a run that is gone: on the same host it is taken over with a message; from another host (a shared file system)
its owner cannot be checked, so it is refused naming the owner and the file to delete once that run is over.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from dsrl_fast.errors import UserError
from dsrl_fast.train.checkpoint import latest_checkpoint
from dsrl_fast.train.metrics_log import print0

__all__ = ["LOCK_FILE", "RUN_ARTIFACTS", "SFT_DIR", "VLLM_INIT_DIR", "LockHolder", "RunLock", "lock_output_dir",
           "prepare_output_dir", "previous_run_artifacts"]

VLLM_INIT_DIR = "vllm_init"
# The toy model after its supervised warm-up (Hugging Face format): the "before RL" model.
SFT_DIR = "sft_warmup"
LOCK_FILE = "run.lock"
# What a previous run leaves behind; `overwrite=true` removes exactly these (and config.resume-<n>.yaml).
RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "training.png", "summary.json", "tensorboard",
                 "wandb_run_id", "config.yaml", VLLM_INIT_DIR, SFT_DIR)
RESUME_CONFIG_GLOB = "config.resume-*.yaml"
# A directory holding any of these (a non-empty checkpoints/ folder, non-empty files) holds a run whose results a
# new run would destroy.
_RESULTS = ("checkpoints", "metrics.jsonl", "samples.jsonl")


def previous_run_artifacts(output_dir: Path) -> list[str]:
    """Names of the results of an earlier run in `output_dir` (non-empty checkpoints/, metrics, samples)."""
    checkpoints = output_dir / "checkpoints"
    found = ["checkpoints"] if checkpoints.is_dir() and any(checkpoints.iterdir()) else []
    return found + [name for name in _RESULTS[1:] if (output_dir / name).is_file() and
                    (output_dir / name).stat().st_size > 0]


def _refuse_file(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir must be a directory, got the file {str(out)!r}")


def _unwritable(directory: Path, exc: OSError) -> UserError:
    return UserError(f"output_dir must be a writable directory, got {str(directory)!r} ({exc.strerror or exc})")


def _check_writable(directory: Path) -> None:
    probe = directory / ".write_probe"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise _unwritable(directory, exc) from exc


@dataclass(frozen=True)
class LockHolder:
    """The run a lock file names."""

    pid: int
    host: str
    started: str

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"

    def running_here(self) -> bool:
        """True when this host has a process `pid` (it may be another process that reused the number)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _read_holder(fd: int) -> LockHolder | None:
    """The holder written in the lock file, or None when it is empty or unreadable (a run killed while writing)."""
    try:
        data: Any = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return LockHolder(int(data["pid"]), str(data["host"]), str(data["started"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    """True while `path` still names the file open as `fd` (a releasing run unlinks it)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class RunLock:
    """The held lock of one output directory; release() (or leaving the `with` block) frees it and removes the file."""

    def __init__(self, path: Path, fd: int, holder: LockHolder):
        self.path, self.holder = path, holder
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file and drop the flock (safe to call twice)."""
        if self._fd is None:
            return
        # Unlinked before the flock drops: a run waiting on this file sees it gone and opens the next one.
        if _same_file(self._fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output_dir(output_dir: str | os.PathLike[str]) -> RunLock:
    """Take `output_dir`'s run lock for this process (the directory is created if missing).

    Raises UserError when another live run holds it (naming its pid, host and start), when the lock file names a run on
    another host, or when `output_dir` is a file or not writable. A lock left by a run that is gone from this host is
    taken over with a message. Call on one rank only (rank 0).
    """
    out = Path(output_dir)
    _refuse_file(out)
    path = out / LOCK_FILE
    host = socket.gethostname()
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _unwritable(out, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"{holder}" if holder else "a run starting up"
            raise UserError(f"output_dir {str(out)!r} is in use by another run ({who}): wait for it to end, stop it, "
                            "or choose another output_dir") from None
        if not _same_file(fd, path):  # released (and removed) by its previous holder in between: take the next one
            os.close(fd)
            continue
        previous = _read_holder(fd)
        if previous is not None and previous.host != host:
            os.close(fd)
            raise UserError(f"output_dir {str(out)!r} is locked by a run on another host ({previous}), which cannot be "
                            f"checked from {host}: if that run is over, delete {str(path)!r}; else choose another "
                            "output_dir")
        if previous is not None:
            state = "no longer holds it" if previous.running_here() else "is not running"
            print0(f"output_dir {str(out)!r}: taking over the lock of a run that is gone ({previous}; pid "
                   f"{previous.pid} {state})")
        holder = LockHolder(os.getpid(), host, datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder.__dict__) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        return RunLock(path, fd, holder)


def prepare_output_dir(output_dir: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> Path | None:
    """Check (and with `overwrite`, clear) the run directory; return the checkpoint to resume from, or None.

    Raises UserError, before anything is written, when `output_dir` is a file or not writable, when it holds another
    run's results and neither `resume` nor `overwrite` is set, or when `resume` finds metrics but no complete
    checkpoint (starting over would replace them). Call on the rank that owns the file system (rank 0), holding the
    run lock (lock_output_dir).
    """
    out = Path(output_dir)
    _refuse_file(out)
    found = previous_run_artifacts(out) if out.is_dir() else []
    resume_from = latest_checkpoint(out) if resume else None
    if found and not (resume or overwrite):
        raise UserError(f"output_dir {str(out)!r} already holds a run ({', '.join(found)}): pass resume=true to "
                        "continue it, overwrite=true to replace it, or another output_dir")
    if resume and resume_from is None and found:
        raise UserError(f"resume=true needs a complete checkpoint in {str(out / 'checkpoints')!r}, found none (the "
                        f"directory holds {', '.join(found)}): pass overwrite=true to start over")
    if overwrite:
        for path in [out / name for name in RUN_ARTIFACTS] + sorted(out.glob(RESUME_CONFIG_GLOB)):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    _check_writable(out)
    _check_writable(out / "checkpoints")
    return resume_from
