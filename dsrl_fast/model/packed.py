"""Hugging Face causal LMs on packed dual-space batches: hidden states of scored tokens, then fused log-probs.

The LM head is never applied to the whole sequence: the trunk runs on the packed row, only the loss-masked rows of
its final hidden states are kept, and `linear_logprobs` turns them into response log-probs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from dsrl_fast.model.attention import TRANSFORMERS_ATTENTION_NAME, register_transformers_attention
from dsrl_fast.loss.logprobs import linear_logprobs
from dsrl_fast.data.packing import DEFAULT_PREFIX, PackedBatch, TokenIds, build_micro_batches, unpack

SPACE_CHOICES = ("cond", "marg", "both")


def prepare_packed_model(model: torch.nn.Module, *, attention_backend: str = "auto",
                         use_liger: bool = False) -> torch.nn.Module:
    """Switch `model` (a transformers causal LM) to the packed varlen attention, in place; returns it.

    attention_backend: "auto" | "triton" | "flash_attn" | "torch" (see dsrl_fast.ops.varlen_attention.varlen_attention).
    use_liger: on CUDA with liger-kernel installed, also apply its RMSNorm / SwiGLU / RoPE kernels to the model.
    """
    name = register_transformers_attention(attention_backend)
    model.set_attn_implementation(name)
    if use_liger:
        _apply_liger(model)
    return model


def _apply_liger(model: torch.nn.Module) -> None:
    if not torch.cuda.is_available():
        raise ValueError("use_liger=True needs CUDA (liger-kernel's kernels are GPU kernels), got a CPU-only machine")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as err:
        raise ValueError("use_liger=True needs liger-kernel installed (pip install liger-kernel)") from err
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """(V, H) output-embedding weight of `model` (the input embedding when tied)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"model must have a bias-free linear LM head, got {type(head).__name__}")
    return head.weight


@contextlib.contextmanager
def gathered(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield `param` whole: under DeepSpeed ZeRO-3 (a partitioned parameter) it is gathered for the block.

    Only for reads (no_grad); the trainer's differentiable path registers the weight as an external parameter of its
    module instead, so ZeRO-3 gathers it for both forward and backward.
    """
    if not hasattr(param, "ds_id"):
        yield param
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        yield param


def packed_hidden_states(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """(M, H) final hidden states (after the last norm) at the loss-masked positions of a packed batch.

    model: a transformers causal LM prepared with `prepare_packed_model`; batch on the model's device.
    """
    if getattr(model.config, "_attn_implementation", None) != TRANSFORMERS_ATTENTION_NAME:
        raise ValueError(f"model must use the packed attention (call prepare_packed_model first), got "
                         f"{model.config._attn_implementation!r}")
    trunk = model.get_decoder()
    cu = batch.cu_seqlens
    out = trunk(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], attention_mask=None,
                use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen,
                max_length_k=batch.max_seqlen)
    return out.last_hidden_state[0].index_select(0, batch.masked_idx)


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, *, attention_backend: str = "auto") -> Iterator[torch.nn.Module]:
    """Switch `model` to the packed varlen attention for the block and restore its previous implementation on exit.

    A host trainer (TRL, verl, OpenRLHF) keeps generating and scoring with its own attention; wrap our packed
    forward *and its backward* in this block. With gradient checkpointing on, the backward recomputes the forward,
    which reads the attention implementation at that time, so the backward must run inside the block. If the model
    already uses the packed attention nothing is switched (nor restored). Yields the model.
    """
    previous = getattr(model.config, "_attn_implementation", None)
    if previous == TRANSFORMERS_ATTENTION_NAME:
        yield model
        return
    prepare_packed_model(model, attention_backend=attention_backend)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def _needs_backward_in_block(model: torch.nn.Module) -> bool:
    """True when a differentiable forward's backward would recompute the forward (gradient checkpointing)."""
    return torch.is_grad_enabled() and model.training and bool(getattr(model, "is_gradient_checkpointing", False))


def _check_space(space: str) -> None:
    if space not in SPACE_CHOICES:
        raise ValueError(f"space must be one of {SPACE_CHOICES}, got {space!r}")


def response_logprobs(model: torch.nn.Module, prompts: Sequence[TokenIds], responses: Sequence[TokenIds], *,
                      space: str = "both", marginal_prefix: TokenIds = DEFAULT_PREFIX,
                      max_tokens_per_batch: int = 16384, with_entropy: bool = False, impl: str = "auto",
                      temperature: float = 1.0) -> dict[str, list[torch.Tensor]]:
    """Per-token log-probs of each response under the conditional [x; y] and/or marginal [prefix; y] context.

    model: a transformers causal LM (Qwen3, Qwen2, Llama, ...). It runs with the packed attention; when it did not
    use it already, its attention implementation is restored on return. With gradient checkpointing on and grad
    enabled, call this inside `with packed_attention(model):` and run the backward there too (the recomputed forward
    needs the packed attention), else a ValueError is raised.
    prompts, responses: one list of token ids (or 1-D int tensor) per sample; responses non-empty.
    space: "cond", "marg" or "both". marginal_prefix: context of the marginal sequences (default Qwen's
    <|im_start|>). max_tokens_per_batch: token budget of one packed forward.
    with_entropy: also return "cond_entropy" / "marg_entropy" lists. impl: fused-loss implementation.

    Returns {"cond": [...], "marg": [...]} (the spaces asked for): one (len(response_i),) fp32 tensor per sample.
    Under torch.no_grad() nothing is kept for backward; otherwise the tensors are differentiable w.r.t. the model,
    except under DeepSpeed ZeRO-3, where the call must run under torch.no_grad() (ValueError otherwise).
    """
    _check_space(space)
    weight = lm_head_weight(model)
    if hasattr(weight, "ds_id") and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("response_logprobs under DeepSpeed ZeRO-3 must run under torch.no_grad() (the LM-head weight "
                         "it gathers is partitioned again before any backward; for gradients use the trainer or the "
                         "TRL/OpenRLHF integrations, which register it as an external parameter), got grad enabled")
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    if getattr(model.config, "_attn_implementation", None) != TRANSFORMERS_ATTENTION_NAME \
            and _needs_backward_in_block(model):
        raise ValueError("response_logprobs with gradient checkpointing and grad enabled must run inside "
                         "`with dsrl_fast.model.packed.packed_attention(model):` together with the backward, got a model "
                         f"using attention {model.config._attn_implementation!r}")
    device = next(model.parameters()).device
    spaces = ("cond", "marg") if space == "both" else (space,)
    keys = list(spaces) + ([f"{s}_entropy" for s in spaces] if with_entropy else [])
    results: dict[str, list[torch.Tensor | None]] = {k: [None] * len(prompts) for k in keys}
    micro_batches = build_micro_batches(prompts, responses, space, max_tokens_per_batch, prefix=marginal_prefix)
    with packed_attention(model), gathered(lm_head_weight(model)) as weight:
        for sample_idx, batch in micro_batches:
            batch = batch.to(device)
            hidden = packed_hidden_states(model, batch)
            labels = batch.labels.index_select(0, batch.masked_idx)
            out = linear_logprobs(hidden, weight, labels, temperature=temperature, with_entropy=with_entropy,
                                  impl=impl)
            pieces = [("", out.logprobs)] + ([("_entropy", out.entropy)] if with_entropy else [])
            for suffix, values in pieces:
                for s, per_sample in unpack(batch, values).items():
                    for local, tensor in enumerate(per_sample):
                        if tensor is not None:
                            results[s + suffix][sample_idx[local]] = tensor
    assert all(t is not None for v in results.values() for t in v), "every sample is packed in every space asked for"
    return results  # type: ignore[return-value]
