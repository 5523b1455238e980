"""Model dimensions the planner can use without downloading anything.

The Qwen3-4B and Qwen3-8B dimensions are shipped (the values of their Hugging Face ``config.json``); any other model
needs a local directory holding its ``config.json``. The embedded toy model (``model.name_or_path: null``) is built
on the meta device to read its config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_QWEN3_COMMON: dict[str, Any] = {
    "vocab_size": 151936,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

SHIPPED_DIMENSIONS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-4B": {**_QWEN3_COMMON, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {**_QWEN3_COMMON, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False},
}


def model_config(name_or_path: str | None) -> Any:
    """The transformers config of `name_or_path` (a ``PretrainedConfig``), read without network access.

    name_or_path: None (the embedded toy Qwen3), a shipped id (see SHIPPED_DIMENSIONS; a "-Base" or "-Instruct"
    suffix has the same dimensions), or a local directory with a ``config.json``.
    Raises ValueError naming the shipped ids for anything else.
    """
    if name_or_path is None:
        return _toy_config()
    if not isinstance(name_or_path, str):
        raise TypeError(f"name_or_path must be a str or None, got {type(name_or_path).__name__}")
    from transformers import AutoConfig, Qwen3Config

    for shipped, dims in SHIPPED_DIMENSIONS.items():
        if name_or_path == shipped or name_or_path.startswith(f"{shipped}-"):
            return Qwen3Config(**dims)
    if (Path(name_or_path) / "config.json").is_file():
        return AutoConfig.from_pretrained(name_or_path)
    raise ValueError(f"model.name_or_path must be one of the shipped shapes {tuple(SHIPPED_DIMENSIONS)} or a local "
                     f"directory holding config.json, got {name_or_path!r}")


def _toy_config() -> Any:
    import torch

    from dsrl_fast.data.toy import TOY_VOCAB
    from dsrl_fast.model.tiny import build_tiny_qwen3

    with torch.device("meta"):
        return build_tiny_qwen3(len(TOY_VOCAB)).config
