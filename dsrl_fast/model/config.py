"""The model section of a run's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsrl_fast.model.dtypes import DTYPES
from dsrl_fast.typed_config import Section, check_choice, check_not_empty

ATTENTION_BACKENDS = ("auto", "triton", "flash_attn", "torch")

@dataclass
class ModelConfig(Section):
    """The policy model.

    Attributes:
        name_or_path: Hugging Face model id or local directory; null selects the embedded tiny toy model
            (a 2-layer Qwen3 with a word-level tokenizer, built in code).
        dtype: parameter dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
        attention_backend: varlen attention for packed batches: "auto", "triton", "flash_attn" or "torch".
        gradient_checkpointing: recompute activations in the backward to save memory (on by default: 8k-token
            responses do not fit without it; the toy demo turns it off).
        use_liger: patch the model with liger-kernel's fused RMSNorm / RoPE / SwiGLU.
        trust_remote_code: allow model code from the hub (passed to transformers).
    """

    SECTION: ClassVar[str] = "model"

    name_or_path: str | None = None
    dtype: str = "auto"
    attention_backend: str = "auto"
    gradient_checkpointing: bool = True
    use_liger: bool = False
    trust_remote_code: bool = False

    def _check(self) -> None:
        check_not_empty(self.key("name_or_path"), self.name_or_path)
        check_choice(self.key("dtype"), self.dtype, DTYPES)
        check_choice(self.key("attention_backend"), self.attention_backend, ATTENTION_BACKENDS)
