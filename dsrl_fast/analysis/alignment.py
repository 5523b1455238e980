"""Gradient alignment of the two spaces (the paper's Fig. 2): ∇θ log P(y) against ∇θ log P(y|x), per rollout.

For one rollout the conditional sequence ``[x; y]`` and the marginal sequence ``[prefix; y]`` are packed into one
row and scored by one forward pass with the fused log-probs (:func:`dsrl_fast.model.packed.response_logprobs`); the two
sums are then differentiated separately (two backward passes over the shared graph). Dot product, norms and cosine
are accumulated in float64 over every trainable parameter (a tied embedding counts once). The per-token
``log P(y_t | x, y_<t) − log P(y_t | y_<t)`` comes from the same forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsrl_fast.model.packed import response_logprobs
from dsrl_fast.data.packing import default_marginal_prefix

__all__ = ["AlignmentResult", "default_marginal_prefix", "gradient_alignment"]


@dataclass(frozen=True)
class AlignmentResult:
    """One rollout's numbers.

    Attributes:
        dot: <∇θ log P(y), ∇θ log P(y|x)> over all parameters.
        cosine: dot / (norm_marginal · norm_conditional); NaN when a gradient is zero.
        norm_marginal / norm_conditional: L2 norms of ∇θ log P(y) and ∇θ log P(y|x).
        logp_marginal / logp_conditional: log P(y) and log P(y|x) (sums over the response tokens).
        token_diff: per response token, log P(y_t | x, y_<t) − log P(y_t | y_<t).
    """

    dot: float
    cosine: float
    norm_marginal: float
    norm_conditional: float
    logp_marginal: float
    logp_conditional: float
    token_diff: list[float]


def _check_ids(name: str, ids: Sequence[int]) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise ValueError(f"{name} must be a non-empty list of non-negative token ids, got {ids!r}")
    return list(ids)


def gradient_alignment(model: torch.nn.Module, prompt_ids: Sequence[int], response_ids: Sequence[int], *,
                       marginal_prefix: Sequence[int], impl: str = "auto",
                       temperature: float = 1.0) -> AlignmentResult:
    """∇θ log P(y) vs ∇θ log P(y|x) for one rollout of `model` (a transformers causal LM, switched to the packed
    attention for the call).

    prompt_ids: x, (P,) token ids; response_ids: y, (L,) token ids; marginal_prefix: the marginal context.
    impl: the fused log-prob implementation ("auto" | "triton" | "torch"); temperature: log-probs of logits / T.
    The model's gradients (.grad) are left untouched.
    """
    prompt = _check_ids("prompt_ids", prompt_ids)
    response = _check_ids("response_ids", response_ids)
    prefix = _check_ids("marginal_prefix", marginal_prefix)
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    if not params:
        raise ValueError("model has no trainable parameters: nothing to differentiate")
    with torch.enable_grad():
        out = response_logprobs(model, [prompt], [response], space="both", marginal_prefix=prefix,
                                max_tokens_per_batch=len(prompt) + len(prefix) + 2 * len(response), impl=impl,
                                temperature=temperature)
        cond, marg = out["cond"][0], out["marg"][0]
        g_cond = torch.autograd.grad(cond.sum(), params, retain_graph=True, allow_unused=True)
        g_marg = torch.autograd.grad(marg.sum(), params, allow_unused=True)
    dot = norm_c = norm_m = 0.0
    for gc, gm in zip(g_cond, g_marg, strict=True):
        c64 = None if gc is None else gc.double()
        m64 = None if gm is None else gm.double()
        if c64 is not None:
            norm_c += float(c64.square().sum())
        if m64 is not None:
            norm_m += float(m64.square().sum())
        if c64 is not None and m64 is not None:
            dot += float((c64 * m64).sum())
    norm_c, norm_m = math.sqrt(norm_c), math.sqrt(norm_m)
    cosine = dot / (norm_c * norm_m) if norm_c > 0 and norm_m > 0 else float("nan")
    diff = (cond.detach().double() - marg.detach().double()).tolist()
    return AlignmentResult(dot, cosine, norm_m, norm_c, float(marg.detach().double().sum()),
                           float(cond.detach().double().sum()), diff)
