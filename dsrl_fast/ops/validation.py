"""Input checks shared by the public functions: each error names the argument, what was expected and what came."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("auto", "triton", "torch")


def check_tensor(name: str, t: object, *, ndim: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """Raise TypeError/ValueError unless `t` is a tensor of `ndim` dims with a dtype in `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    return t


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise ValueError if any tensor in `others` is on another device than `reference`."""
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} must be on {reference_name}'s device {reference.device}, got {t.device}")


def check_rows(name: str, t: torch.Tensor | None, n: int) -> None:
    """Raise ValueError unless `t` (if given) has shape (n,)."""
    if t is not None and tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one entry per token of hidden), got {tuple(t.shape)}")


def check_labels_in_range(labels: torch.Tensor, vocab: int) -> None:
    """Raise ValueError if a label is outside [0, vocab) (one host sync)."""
    if labels.numel() == 0:
        return
    low, high = torch.stack([labels.min(), labels.max()]).tolist()
    if low < 0 or high >= vocab:
        raise ValueError(f"labels must lie in [0, {vocab}) (the vocabulary of weight), got values in [{low}, {high}]")


def resolve_impl(impl: str, device: torch.device, *, name: str = "impl",
                 choices: tuple[str, ...] = IMPLS) -> str:
    """Map `impl` (one of `choices`, "auto" among them) to what runs on `device`: "auto" is Triton on CUDA and
    PyTorch elsewhere; "triton" on CPU needs TRITON_INTERPRET=1. `name` is the argument named in errors."""
    if impl not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{name}='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), got device {device}"
        )
    return impl
