"""Writing a Hugging Face model directory without the noise transformers' save_pretrained makes on every call.

Two lines a run would otherwise print at every checkpoint: transformers' "Writing model shards" progress bar, and
DeepSpeed's "Setting accelerator to CPU" warning, which appears on CPU machines even in runs that do not use
DeepSpeed because save_pretrained asks accelerate to unwrap the model and accelerate imports DeepSpeed (when it is
installed) to compare classes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["quiet_saving", "save_hf_model"]

_DEEPSPEED_LOGGER = "DeepSpeed"
_CPU_NOTICE = "Setting accelerator to CPU"


class _DropCpuNotice(logging.Filter):
    """Drops DeepSpeed's CPU-accelerator notice and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_CPU_NOTICE)


@contextlib.contextmanager
def quiet_saving() -> Iterator[None]:
    """Within the block, transformers shows no progress bars and DeepSpeed's logger drops its CPU-accelerator
    notice; both are restored afterwards (DeepSpeed's logger keeps every other message)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    notice = _DropCpuNotice()
    logger = logging.getLogger(_DEEPSPEED_LOGGER)
    hf_logging.disable_progress_bar()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
        if bars:
            hf_logging.enable_progress_bar()


def save_hf_model(model: Any, tokenizer: Any, directory: str | os.PathLike[str],
                  state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """``model.save_pretrained`` (with `state_dict` when given) and ``tokenizer.save_pretrained`` into `directory`
    (created), quietly (:func:`quiet_saving`). Returns the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    with quiet_saving():
        if state_dict is None:
            model.save_pretrained(path)
        else:
            model.save_pretrained(path, state_dict=state_dict)
        tokenizer.save_pretrained(path)
    return path
