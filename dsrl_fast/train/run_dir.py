"""The run directory: refuse to mix two runs, check it is writable before the heavy work, clean up after.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``, ``training.png``, ``checkpoints/``,
``tensorboard/``, ``wandb_run_id``, ``sft_warmup/`` (the toy model after its supervised warm-up) and, while a vLLM
run is alive, ``vllm_init/`` (the initial weights vLLM loads).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dsrl_fast.errors import UserError
from dsrl_fast.train.checkpoint import latest_checkpoint

__all__ = ["RUN_ARTIFACTS", "SFT_DIR", "VLLM_INIT_DIR", "prepare_output_dir", "previous_run_artifacts"]

VLLM_INIT_DIR = "vllm_init"
# The toy model after its supervised warm-up (Hugging Face format): the "before RL" model.
SFT_DIR = "sft_warmup"
# What a previous run leaves behind; `overwrite=true` removes exactly these.
RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "training.png", "tensorboard", "wandb_run_id",
                 "config.yaml", VLLM_INIT_DIR, SFT_DIR)
# A directory holding any of these (a non-empty checkpoints/ folder, non-empty files) holds a run whose results a
# new run would destroy.
_RESULTS = ("checkpoints", "metrics.jsonl", "samples.jsonl")


def previous_run_artifacts(output_dir: Path) -> list[str]:
    """Names of the results of an earlier run in `output_dir` (non-empty checkpoints/, metrics, samples)."""
    checkpoints = output_dir / "checkpoints"
    found = ["checkpoints"] if checkpoints.is_dir() and any(checkpoints.iterdir()) else []
    return found + [name for name in _RESULTS[1:] if (output_dir / name).is_file() and
                    (output_dir / name).stat().st_size > 0]


def _check_writable(directory: Path) -> None:
    probe = directory / ".write_probe"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir must be a writable directory, got {str(directory)!r} ({exc.strerror or exc})") \
            from exc


def prepare_output_dir(output_dir: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> Path | None:
    """Check (and with `overwrite`, clear) the run directory; return the checkpoint to resume from, or None.

    Raises UserError, before anything is written, when `output_dir` is a file or not writable, when it holds another
    run's results and neither `resume` nor `overwrite` is set, or when `resume` finds metrics but no complete
    checkpoint (starting over would replace them). Call on the rank that owns the file system (rank 0).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir must be a directory, got the file {str(out)!r}")
    found = previous_run_artifacts(out) if out.is_dir() else []
    resume_from = latest_checkpoint(out) if resume else None
    if found and not (resume or overwrite):
        raise UserError(f"output_dir {str(out)!r} already holds a run ({', '.join(found)}): pass resume=true to "
                        "continue it, overwrite=true to replace it, or another output_dir")
    if resume and resume_from is None and found:
        raise UserError(f"resume=true needs a complete checkpoint in {str(out / 'checkpoints')!r}, found none (the "
                        f"directory holds {', '.join(found)}): pass overwrite=true to start over")
    if overwrite:
        for name in RUN_ARTIFACTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    _check_writable(out)
    _check_writable(out / "checkpoints")
    return resume_from
