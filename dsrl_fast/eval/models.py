"""Models to evaluate: `--model [label=]path` parsing, and loading one as a tokenizer plus a rollout engine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsrl_fast.rollout.base import RolloutEngine
from dsrl_fast.model.dtypes import model_dtype

__all__ = ["ModelSpec", "load_tokenizer", "model_positions", "open_engine", "parse_model_specs", "resolve_engine",
           "torch_dtype"]

_LABEL_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a label (file names, table rows) and a local directory or hub id."""

    label: str
    path: str


def _default_label(path: str) -> str:
    parts = [p for p in Path(path).parts if p not in ("/", "hf", "checkpoints")]
    if not parts:
        return "model"
    label = parts[-1]
    if label.startswith("step_") and len(parts) > 1:
        label = f"{parts[-2]}-{label}"
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", label)


def parse_model_specs(items: list[str]) -> list[ModelSpec]:
    """One ModelSpec per `--model` value: `path` (label from the path) or `label=path`; labels must be distinct and
    each path an existing directory or a hub id."""
    if not items:
        raise ValueError("--model must be given at least once (a model directory or hub id)")
    specs = []
    for item in items:
        label, sep, path = item.partition("=")
        spec = ModelSpec(label.strip(), path.strip()) if sep and _LABEL_RE.match(label.strip()) and path.strip() \
            else ModelSpec(_default_label(item), item)
        if not Path(spec.path).is_dir() and not _HUB_ID_RE.match(spec.path):
            raise ValueError(f"model {spec.path!r} is neither a model directory nor a hub id (org/name)")
        if Path(spec.path).is_dir() and not (Path(spec.path) / "config.json").is_file():
            raise ValueError(f"model {spec.path!r} must be a Hugging Face model directory (with a config.json), got a "
                             "directory without one")
        specs.append(spec)
    labels = [s.label for s in specs]
    duplicates = sorted({lab for lab in labels if labels.count(lab) > 1})
    if duplicates:
        raise ValueError(f"model labels must be distinct, got {duplicates} more than once: pass --model label=path")
    return specs


def resolve_engine(engine: str) -> str:
    """"auto" is "vllm" on CUDA when vLLM is installed, else "hf"."""
    if engine != "auto":
        return engine
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            return "vllm"
    return "hf"


def load_tokenizer(path: str) -> Any:
    """The model's tokenizer (transformers AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def model_positions(path: str) -> int | None:
    """max_position_embeddings of the model's config, or None when it has none."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype option ("auto": bf16 on CUDA, fp32 on CPU)."""
    return model_dtype(name, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def open_engine(path: str, engine: str, *, dtype: str, seed: int, max_model_len: int,
                gpu_memory_utilization: float, cpu_kv_cache_gib: int) -> RolloutEngine:
    """A rollout engine sampling from the model at `path`: "hf" (transformers generate) or "vllm"."""
    resolved = torch_dtype(dtype)
    if engine == "vllm":
        from dsrl_fast.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(path, dtype=str(resolved).removeprefix("torch."), seed=seed, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gib=cpu_kv_cache_gib)
    from transformers import AutoModelForCausalLM

    from dsrl_fast.rollout.hf_engine import HFEngine

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolved).to(device)
    return HFEngine(model)
