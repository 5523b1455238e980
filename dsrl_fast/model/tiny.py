"""The tiny Qwen3 the toy task and the tests train: built in code, saved as a directory transformers and vLLM load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsrl_fast.model.saving import save_hf_model

if TYPE_CHECKING:
    from transformers import Qwen3ForCausalLM


def build_tiny_qwen3(
    vocab_size: int,
    seed: int = 0,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Qwen3ForCausalLM:
    """A freshly initialized fp32 Qwen3: 2 layers, hidden 128, 4 heads (2 KV, head_dim 32), MLP 512,
    tied embeddings, 64 positions. The global RNG is left untouched."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    for name, value in ids.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size):
            raise ValueError(f"{name} must be None or an int in [0, {vocab_size}), got {value!r}")
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=512,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        dtype="float32",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return model


def save_tiny_model(model: Any, tokenizer: Any, directory: str | os.PathLike[str]) -> Path:
    """Write a Hugging Face model directory (config, safetensors, generation config, tokenizer) that
    ``transformers.AutoModelForCausalLM``/``AutoTokenizer`` and ``vllm.LLM`` load. Returns the path."""
    return save_hf_model(model, tokenizer, directory)
