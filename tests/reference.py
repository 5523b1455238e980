"""Float64 oracles written independently of the library: materialized logits, per-sequence Python loops."""

from __future__ import annotations

import torch

from dsrl_fast import PolicyLossConfig


def logprobs_entropy_f64(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float64 log-probs and entropies from materialized logits; differentiable in hidden and weight."""
    logits = hidden.double() @ weight.double().T / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(1, labels[:, None]).squeeze(1), entropy


def policy_loss_f64(logp: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    old: torch.Tensor | None, ref: torch.Tensor | None, seq_ids: torch.Tensor,
                    cfg: PolicyLossConfig) -> torch.Tensor:
    """The loss spelled out sequence by sequence (float64)."""
    old = logp.detach() if old is None else old.double()
    per_seq: list[tuple[list[torch.Tensor]]] = []
    for s in seq_ids.unique().tolist():
        idx = [i for i in range(len(seq_ids)) if seq_ids[i] == s and mask[i]]
        if not idx:
            continue
        a = [float(advantages[i]) for i in idx]
        if cfg.samples == "negative" and not any(x < 0 for x in a):
            continue
        if cfg.samples == "positive" and not any(x > 0 for x in a):
            continue
        losses = []
        for i in idx:
            adv = float(advantages[i])
            log_ratio = logp[i] - old[i]
            if cfg.log_ratio_clamp is not None:
                log_ratio = log_ratio.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
            ratio = torch.exp(log_ratio)
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high))
            if cfg.clip_ratio_c is not None and adv < 0:
                pg = torch.minimum(pg, torch.tensor(-adv * cfg.clip_ratio_c, dtype=torch.float64))
            term = pg
            if cfg.kl_coef:
                d = logp[i] - ref[i].double()
                kl = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[cfg.kl_type]
                term = term + cfg.kl_coef * (kl * ratio if cfg.kl_ratio_weighted else kl)
            if cfg.entropy_coef:
                term = term - cfg.entropy_coef * entropy[i]
            losses.append(term)
        per_seq.append(losses)
    if not per_seq:
        return (logp * 0).sum()
    if cfg.agg == "token-mean":
        count = cfg.norm_tokens or sum(len(s) for s in per_seq)
        total = sum(sum(s) for s in per_seq) / count
    elif cfg.agg == "seq-mean-token-mean":
        total = sum(sum(s) / len(s) for s in per_seq) / len(per_seq)
    elif cfg.agg == "seq-mean-token-sum":
        total = sum(sum(s) for s in per_seq) / len(per_seq)
    else:
        total = sum(sum(s) for s in per_seq) / (len(per_seq) * cfg.max_response_len)
    return total * cfg.loss_scale
