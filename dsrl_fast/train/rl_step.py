"""One RL step from rollouts to gradients: rewards, advantages, sample selection, packed micro-batches, losses.

Only the passes a phase needs run: the marginal phase packs `[prefix; y]` sequences only, the conditional phase
`[x; y]` only, samples the phase's filter drops are never packed, and `run_update` makes one optimizer step: without
`old_logprobs` it is on-policy (old log-probs are the current ones detached, no extra forward). Several updates per
rollout batch (mini-batches, epochs), old log-probs, PPO's critic and token-level advantages are arranged by
dsrl_fast.train.batch_update, which calls `run_update` once per optimizer step. Samples with zero
advantage are not packed either when that is exact (on-policy, no KL, no entropy bonus: their gradient is zero),
but they still count in the loss denominators.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsrl_fast.rl.advantages import BATCH_ESTIMATORS, compute_advantages
from dsrl_fast.data.packing import PackedBatch, build_micro_batches
from dsrl_fast.loss.token_loss import PolicyLossOutput
from dsrl_fast.rollout.base import Rollout
from dsrl_fast.distributed import reduce_floats, reduce_tensor
from dsrl_fast.rl.algorithms import Phase
from dsrl_fast.train.updaters import Updater

PACK_SPACE = {"marginal": "marg", "conditional": "cond"}


@dataclass
class StepSamples:
    """The samples of one step on this rank: one entry per rollout, grouped by prompt (n per prompt)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    rewards: torch.Tensor  # (B·n,) fp32
    group_ids: torch.Tensor  # (B·n,) int64, the prompt of each rollout


def collect_samples(prompts: Sequence[list[int]], rollouts: Sequence[Rollout], rewards: Sequence[float],
                    group_offset: int = 0) -> StepSamples:
    """Line rollouts up with their prompts and rewards (group ids offset by the rank's first prompt)."""
    return StepSamples(
        prompt_ids=[list(prompts[r.prompt_index]) for r in rollouts],
        response_ids=[list(r.response_ids) for r in rollouts],
        sampler_logprobs=[list(r.logprobs) for r in rollouts],
        rewards=torch.tensor(list(rewards), dtype=torch.float32),
        group_ids=torch.tensor([group_offset + r.prompt_index for r in rollouts], dtype=torch.int64),
    )


def sample_advantages(samples: StepSamples, estimator: str) -> torch.Tensor:
    """(B·n,) fp32 per-sample advantages of the phase's estimator. The batch estimators (reinforce_pp,
    reinforce_pp_baseline) are token-count weighted and whitened over the global batch (all ranks), as verl's."""
    counts = None
    if estimator in BATCH_ESTIMATORS:
        counts = torch.tensor([len(r) for r in samples.response_ids], dtype=torch.float32)
    return compute_advantages(samples.rewards, estimator, group_ids=samples.group_ids, token_counts=counts,
                              reduce_sum=reduce_tensor)


def selected_samples(advantages: torch.Tensor, samples_filter: str, skip_zero: bool) -> tuple[list[int], list[int]]:
    """(kept, trained): indices the phase keeps (they count in denominators) and the subset worth a forward."""
    adv = advantages.tolist()
    if samples_filter == "negative":
        kept = [i for i, a in enumerate(adv) if a < 0]
    elif samples_filter == "positive":
        kept = [i for i, a in enumerate(adv) if a > 0]
    else:
        kept = list(range(len(adv)))
    trained = [i for i in kept if adv[i] != 0] if skip_zero else kept
    return kept, trained


def update_samples(advantages: torch.Tensor, phase: Phase,
                   token_advantages: Sequence[torch.Tensor] | None) -> tuple[list[int], list[int]]:
    """(kept, trained) of `phase`'s update: zero-advantage samples are skipped only when nothing else (KL, entropy
    bonus, token advantages) gives them a gradient."""
    skip_zero = phase.loss.kl_coef == 0 and phase.loss.entropy_coef == 0 and token_advantages is None
    return selected_samples(advantages, phase.samples, skip_zero)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class UpdateResult:
    """Host-side figures of one step's update (global over ranks)."""

    loss: float
    clip_frac: float
    entropy: float
    kept_tokens: float
    trained_tokens: float
    packed_tokens: float
    logprob_drift: float | None
    grad_norm: float
    stepped: bool
    # max over ranks of the tokens a rank packed / the mean over ranks (1.0 = perfectly balanced)
    rank_token_imbalance: float | None = None


def _token_values(batch: PackedBatch, sample_index: list[int], per_sample: Sequence[float] | torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """(M,) fp32: each loss-masked token gets its sample's value."""
    values = [float(per_sample[sample_index[s]]) for s in batch.seq_sample_host]
    return torch.tensor(values, dtype=torch.float32).repeat_interleave(
        torch.tensor(batch.seq_response_lens)).to(device)


def run_update(updater: Updater, samples: StepSamples, advantages: torch.Tensor, phase: Phase, *,
               marginal_prefix: Sequence[int], max_tokens: int, device: torch.device, lr: float,
               ref_logprobs_fn: Callable[[PackedBatch], torch.Tensor] | None = None,
               old_logprobs: Sequence[torch.Tensor] | None = None,
               token_advantages: Sequence[torch.Tensor] | None = None) -> UpdateResult:
    """Forward/backward every micro-batch of this rank, then one optimizer step (skipped if nothing is trained).

    Every rank runs the same number of micro-batches (ZeRO collectives need it): ranks with fewer pad with a
    zero-weight copy of one of their samples.
    old_logprobs: per sample (L_i,) fp32 behaviour log-probs in the phase's space; None = on-policy.
    token_advantages: per sample (L_i,) fp32 token advantages (PPO's GAE); None = `advantages` on every token.
    `advantages` still selects the phase's samples (NSR / PSR).
    """
    loss_cfg = phase.loss
    kept, trained = update_samples(advantages, phase, token_advantages)
    resp_len = [len(r) for r in samples.response_ids]
    local = [float(sum(resp_len[i] for i in kept)), float(len(kept)), float(len(trained))]
    global_tokens, global_seqs, global_trained = reduce_floats(local)
    space = PACK_SPACE[phase.space]
    micro = build_micro_batches([samples.prompt_ids[i] for i in trained], [samples.response_ids[i] for i in trained],
                                space, max_tokens, prefix=marginal_prefix) if trained else []
    local_packed = float(sum(b.num_tokens for _, b in micro))
    num_micro, max_rank_packed = reduce_floats([float(len(micro)), local_packed], dist.ReduceOp.MAX)
    if global_trained == 0:
        return UpdateResult(0.0, 0.0, float("nan"), global_tokens, 0.0, 0.0, None, 0.0, stepped=False)

    padding = int(num_micro) - len(micro)
    if padding:
        filler = build_micro_batches([samples.prompt_ids[0]], [samples.response_ids[0]], space, max_tokens,
                                     prefix=marginal_prefix)[0]
        micro += [([-1], filler[1])] * padding
    # Figures stay on the device until the single host transfer after the optimizer step.
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    for k, (local_idx, batch) in enumerate(micro):
        is_filler = local_idx == [-1]
        owners = [trained[i] for i in local_idx] if not is_filler else [0]
        batch = batch.to(device)
        if token_advantages is None:
            adv_tokens = _token_values(batch, owners, advantages, device)
        else:
            adv_tokens = torch.cat([token_advantages[owners[s]] for s in batch.seq_sample_host]).to(device)
        if is_filler:
            cfg = dataclasses.replace(loss_cfg, loss_scale=0.0, norm_tokens=None if loss_cfg.agg != "token-mean"
                                      else 1)
        elif loss_cfg.agg == "token-mean":
            cfg = dataclasses.replace(loss_cfg, norm_tokens=max(1, int(global_tokens)))
        else:
            cfg = dataclasses.replace(loss_cfg, loss_scale=loss_cfg.loss_scale * len(local_idx) / global_seqs)
        extra = {"ref_logprobs": ref_logprobs_fn(batch) if ref_logprobs_fn is not None else None}
        if old_logprobs is not None:
            extra["old_logprobs"] = torch.cat([old_logprobs[owners[s]] for s in batch.seq_sample_host]).to(device)
        out: PolicyLossOutput = updater.forward_backward(batch, adv_tokens, cfg, last=k == len(micro) - 1, **extra)
        if is_filler:
            continue
        kept_tokens = out.metrics["kept_tokens"].double()
        drift, drift_n = sums.new_zeros(()), 0
        if phase.space == "conditional":
            sampler = [lp for s in batch.seq_sample_host for lp in samples.sampler_logprobs[owners[s]]]
            drift = (out.logprobs.detach() - torch.tensor(sampler, device=device)).abs().sum().double()
            drift_n = len(sampler)
        sums += torch.stack([out.loss.detach().double(), out.metrics["clip_frac"].double() * kept_tokens,
                             out.metrics["entropy_mean"].double() * kept_tokens, kept_tokens,
                             sums.new_tensor(batch.num_tokens), drift, sums.new_tensor(drift_n)])
    grad_norm = updater.step(lr)
    keys = ("loss", "clip", "entropy", "tokens", "packed", "drift", "drift_n")
    totals = dict(zip(keys, reduce_floats(sums.tolist())))
    tokens = max(totals["tokens"], 1.0)
    return UpdateResult(
        loss=totals["loss"], clip_frac=totals["clip"] / tokens, entropy=totals["entropy"] / tokens,
        kept_tokens=global_tokens, trained_tokens=totals["tokens"], packed_tokens=totals["packed"],
        logprob_drift=totals["drift"] / totals["drift_n"] if totals["drift_n"] else None, grad_norm=grad_norm,
        stepped=True, rank_token_imbalance=max_rank_packed * _world_size() / totals["packed"] if totals["packed"]
        else None,
    )
