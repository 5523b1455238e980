"""Model dtypes by name: the values of model.dtype (train) and eval's dtype option, and the torch dtype of each."""

from __future__ import annotations

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of model.dtype `name` ("auto": bfloat16 on CUDA, float32 elsewhere)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
