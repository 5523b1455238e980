"""What one rollout batch becomes: advantages, old log-probs, `mini_batches × epochs` policy updates, critic updates.

Advantages (every batch statistic is global over the data-parallel ranks):
- the phase's outcome estimator (dsrl_fast.rl.advantages) on the rewards;
- with a k1 KL penalty in the reward (`kl_in_reward` β > 0, conditional steps only, as verl's `use_kl_in_reward`):
  each response token t gets the reward -β·(log π_old(y_t) - log π_ref(y_t)) and the last token also the outcome
  reward. Sample estimators (grpo, rloo, reinforce_pp_baseline, ...) take each response's summed reward;
  reinforce_pp takes the per-token return Σ_{k≥t} r_k, whitened over all tokens of the batch (verl's REINFORCE++);
- PPO ("gae"): GAE(γ, λ) over the per-token rewards and the critic's values, whitened over all tokens of the batch.

Updates: the batch is split into `mini_batches` contiguous runs of whole prompt groups on every rank (rank r's k-th
run and the other ranks' k-th runs form global mini-batch k, normalized by its own global token/sequence count), and
the runs are visited `epochs` times: `mini_batches × epochs` optimizer steps. Beyond one update the loss needs the
behaviour policy's log-probs: one no-grad pass of the policy at its rollout weights through the fused log-prob kernel
(`old_logprobs="recompute"`), or the sampler's own log-probs (`"sampler"`, conditional steps; marginal steps always
recompute, since the sampler scores with the prompt). With one update the loss is on-policy and no extra pass runs.

PPO's critic (dsrl_fast.train.critic) scores every response on the conditional space before the update (old values
for GAE and value clipping) and is then trained for the same `mini_batches × epochs` on the GAE returns, also during
a dsrl marginal phase and during its own warm-up steps (PPO steps before `warmup_steps`, on which the policy does not
move).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsrl_fast.rl.advantages import gae, whiten
from dsrl_fast.rl.algorithms import Phase
from dsrl_fast.distributed import reduce_floats, reduce_tensor
from dsrl_fast.train.sections import OLD_LOGPROBS
from dsrl_fast.train.critic import ValueLossConfig, filler_config
from dsrl_fast.train.rl_step import StepSamples, UpdateResult, run_update, sample_advantages, update_samples
from dsrl_fast.train.scoring import (
    ScoreFn,
    filled,
    packed_micro_batches,
    padded,
    policy_logprob_fn,
    rows,
    score,
    subset,
    token_mean,
)
from dsrl_fast.train.updaters import Updater

__all__ = ["OLD_LOGPROBS", "BatchResult", "CriticSetup", "Packing", "UpdateOptions", "mini_batch_groups",
           "policy_logprob_fn", "run_batch"]



@dataclass(frozen=True)
class UpdateOptions:
    """How a rollout batch becomes updates (see the module docstring).

    mini_batches: optimizer steps per pass over the batch (whole prompt groups per mini-batch).
    epochs: passes over the batch. old_logprobs: "recompute" or "sampler".
    kl_in_reward: β of the k1 KL penalty folded into the reward (needs a reference); 0 disables it.
    gamma, lam: GAE discount and λ (PPO only).
    marginal_logprob: on marginal steps, also report the mean marginal log-prob per token of the scored responses
        at the rollout weights (`marginal_logprob_mean`, for the guard; costs one no-grad pass, which then serves as
        the old log-probs).
    """

    mini_batches: int = 1
    epochs: int = 1
    old_logprobs: str = "recompute"
    kl_in_reward: float = 0.0
    gamma: float = 1.0
    lam: float = 1.0
    marginal_logprob: bool = False

    def __post_init__(self) -> None:
        for name in ("mini_batches", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"old_logprobs must be one of {OLD_LOGPROBS}, got {self.old_logprobs!r}")
        if not self.kl_in_reward >= 0:
            raise ValueError(f"kl_in_reward must be >= 0, got {self.kl_in_reward!r}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")

    @property
    def updates(self) -> int:
        """Optimizer steps per rollout batch."""
        return self.mini_batches * self.epochs


@dataclass(frozen=True)
class Packing:
    """How samples become packed micro-batches: the marginal prefix token ids, the token budget of a micro-batch and
    the device the batches go to."""

    marginal_prefix: Sequence[int]
    max_tokens: int
    device: torch.device


@dataclass(frozen=True)
class CriticSetup:
    """PPO's critic: its updater (module: dsrl_fast.train.critic.CriticModule), learning rate, value clipping
    (None: off) and the number of first steps during which only the critic trains."""

    updater: Updater
    lr: float
    value_clip: float | None
    warmup_steps: int


@dataclass
class BatchResult:
    """advantages: (B·n,) fp32 per sample (a response's mean token advantage under token-level estimators).
    update: the policy updates' figures (merged over updates). metrics: extra metrics.jsonl entries (critic,
    reward KL, number of updates, marginal log-prob). skip_reason: why the policy did not move, when known."""

    advantages: torch.Tensor
    update: UpdateResult
    metrics: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None


@dataclass(frozen=True)
class _Scores:
    """A batch's scores the policy updates use: per-sample advantages (N,), per-token advantages (token-level
    estimators), the conditional old log-probs when already scored, the policy's and the reference's scorers."""

    advantages: torch.Tensor
    token_adv: list[torch.Tensor] | None
    old_cond: list[torch.Tensor] | None
    policy_fn: ScoreFn
    ref_logprobs_fn: ScoreFn | None



def mini_batch_groups(group_ids: torch.Tensor, mini_batches: int) -> list[list[int]]:
    """Sample indices of each mini-batch: `mini_batches` contiguous runs of whole groups, as even as possible.

    group_ids: (N,) int64, samples grouped by prompt (equal ids adjacent)."""
    ids = group_ids.tolist()
    starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    if len(starts) < mini_batches:
        raise ValueError(f"mini_batches must be <= the {len(starts)} prompt groups of this rank, got {mini_batches}")
    bounds = starts + [len(ids)]
    cuts = [bounds[k * len(starts) // mini_batches] for k in range(mini_batches + 1)]
    return [list(range(cuts[k], cuts[k + 1])) for k in range(mini_batches)]



def _merge(results: list[UpdateResult], epochs: int) -> UpdateResult:
    """One UpdateResult for several updates: means over the updates that stepped, token-weighted clip fraction and
    entropy, and the token counts / sampler drift of one pass over the batch (the first epoch)."""
    stepped = [r for r in results if r.stepped]
    if len(results) == 1 or not stepped:
        return results[0]
    first = results[:len(results) // epochs]
    tokens = max(sum(r.trained_tokens for r in stepped), 1.0)
    drifts = [r for r in first if r.logprob_drift is not None and r.trained_tokens]
    drift_tokens = sum(r.trained_tokens for r in drifts)
    return dataclasses.replace(
        stepped[0],
        loss=sum(r.loss for r in stepped) / len(stepped),
        clip_frac=sum(r.clip_frac * r.trained_tokens for r in stepped) / tokens,
        entropy=sum(r.entropy * r.trained_tokens for r in stepped) / tokens,
        kept_tokens=sum(r.kept_tokens for r in first),
        trained_tokens=sum(r.trained_tokens for r in first),
        packed_tokens=sum(r.packed_tokens for r in first),
        logprob_drift=sum(r.logprob_drift * r.trained_tokens for r in drifts) / drift_tokens if drifts else None,
        grad_norm=sum(r.grad_norm for r in stepped) / len(stepped),
    )


def _token_rewards(samples: StepSamples, lengths: list[int], kl: list[torch.Tensor] | None, beta: float,
                   device: torch.device) -> list[torch.Tensor]:
    """Per-token rewards: the outcome reward on each response's last token, minus β·kl_t on every token."""
    out = []
    for i, n in enumerate(lengths):
        r = torch.zeros(n, device=device)
        r[-1] = samples.rewards[i].to(device)
        out.append(r - beta * kl[i] if kl is not None else r)
    return out


def _whiten_tokens(values: list[torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
    table, mask = padded(values, lengths)
    return rows(whiten(table, mask.float(), reduce_tensor), lengths)


def _critic_update(critic: CriticSetup, samples: StepSamples, chunks: list[list[int]], options: UpdateOptions,
                   returns: list[torch.Tensor], old_values: list[torch.Tensor], *, max_tokens: int,
                   prefix: Sequence[int], device: torch.device) -> dict[str, float]:
    """`mini_batches × epochs` critic steps on the conditional space; value loss, clip share and gradient norm."""
    lengths = [len(r) for r in samples.response_ids]
    plans = []
    for chunk in chunks:
        (tokens,) = reduce_floats([float(sum(lengths[i] for i in chunk))])
        plans.append((packed_micro_batches(samples, chunk, "conditional", max_tokens, prefix), max(1, int(tokens))))
    losses, clipped, norms, tokens_seen = [], 0.0, [], 0.0
    for _ in range(options.epochs):
        for micro, tokens in plans:
            cfg = ValueLossConfig(clip=critic.value_clip, norm_tokens=tokens)
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            for k, m in enumerate(micro):
                batch = m.batch.to(device)
                owners = m.owners if m.owners is not None else [0]
                target = torch.cat([returns[owners[s]] for s in batch.seq_sample_host])
                old = torch.cat([old_values[owners[s]] for s in batch.seq_sample_host])
                out = critic.updater.forward_backward(batch, target, cfg if m.owners is not None else
                                                      filler_config(cfg), last=k == len(micro) - 1, old_values=old)
                if m.owners is not None:
                    sums += torch.stack([out.loss.detach().double(), out.metrics["value_clip_frac"].double(),
                                         out.metrics["tokens"].double()])
            norms.append(critic.updater.step(critic.lr))
            loss, clip, seen = reduce_floats(sums.tolist())
            losses.append(loss)
            clipped += clip
            tokens_seen += seen
    return {"value_loss": sum(losses) / len(losses), "value_clip_frac": clipped / max(tokens_seen, 1.0),
            "critic_grad_norm": sum(norms) / len(norms)}


def _explained_variance(returns: list[torch.Tensor], values: list[torch.Tensor]) -> float:
    """1 - Var(R - V) / Var(R) over every token of the global batch (V: the critic before its update)."""
    r = torch.cat(returns).double()
    d = r - torch.cat(values).double()
    n, sr, sr2, sd, sd2 = reduce_floats([float(r.numel()), float(r.sum()), float(r.square().sum()), float(d.sum()),
                                   float(d.square().sum())])
    var_r = sr2 / n - (sr / n) ** 2
    var_d = sd2 / n - (sd / n) ** 2
    return 1.0 - var_d / var_r if var_r > 1e-12 else float("nan")


def run_batch(updater: Updater, samples: StepSamples, phase: Phase, *, step: int, lr: float, packing: Packing,
              options: UpdateOptions = UpdateOptions(), critic: CriticSetup | None = None,
              ref_logprobs_fn: ScoreFn | None = None) -> BatchResult:
    """Advantages, the policy's updates (dsrl_fast.train.rl_step.run_update: one optimizer step on the samples it is
    given, `options.updates` times), then the critic's updates. Every rank must call it with its own samples.

    ref_logprobs_fn: reference log-probs of a packed batch (needed by `options.kl_in_reward` and the loss's KL).
    """
    marginal_prefix, max_tokens, device = packing.marginal_prefix, packing.max_tokens, packing.device
    if phase.estimator == "gae" and critic is None:
        raise ValueError(f"phase {phase.algo!r} needs a critic (CriticSetup), got None")
    n = len(samples.response_ids)
    lengths = [len(r) for r in samples.response_ids]
    conditional = phase.space == "conditional"
    reward_kl = options.kl_in_reward > 0 and conditional
    if reward_kl and ref_logprobs_fn is None:
        raise ValueError(f"kl_in_reward={options.kl_in_reward} needs ref_logprobs_fn, got None")
    policy_fn = policy_logprob_fn(updater.module.model, phase.loss.temperature)
    metrics: dict[str, Any] = {}

    # Conditional scores of every sample: the critic's values, and π_old / π_ref for the reward's KL.
    values = old_cond = kl = None
    if critic is not None or reward_kl:
        everyone = packed_micro_batches(samples, list(range(n)), "conditional", max_tokens, marginal_prefix)
        if critic is not None:
            values = filled(score(everyone, critic.updater.module.model, n, device), lengths, device)
        if reward_kl:
            assert ref_logprobs_fn is not None
            old_cond = filled(score(everyone, policy_fn, n, device), lengths, device)
            ref = filled(score(everyone, ref_logprobs_fn, n, device), lengths, device)
            kl = [o - r for o, r in zip(old_cond, ref)]
            metrics["reward_kl"] = token_mean(list(kl))
    rewards = _token_rewards(samples, lengths, kl, options.kl_in_reward, device)

    token_adv: list[torch.Tensor] | None = None
    returns = None
    if values is not None:
        padded_r, mask = padded(rewards, lengths)
        out = gae(padded_r, padded(values, lengths)[0], mask, options.gamma, options.lam)
        returns = rows(out.returns, lengths)
        if phase.estimator == "gae":
            token_adv = _whiten_tokens(rows(out.advantages, lengths), lengths)
    if phase.estimator == "reinforce_pp" and reward_kl:
        padded_r, mask = padded(rewards, lengths)
        token_adv = _whiten_tokens(rows(gae(padded_r, torch.zeros_like(padded_r), mask, 1.0, 1.0).advantages,
                                         lengths), lengths)
    if token_adv is not None:
        advantages = torch.stack([a.mean() for a in token_adv]).cpu()
    else:
        scored = samples if kl is None else dataclasses.replace(
            samples, rewards=torch.stack([r.sum() for r in rewards]).cpu())
        advantages = sample_advantages(scored, phase.estimator)

    groups = mini_batch_groups(samples.group_ids, options.mini_batches)
    if phase.estimator == "gae" and critic is not None and step < critic.warmup_steps:
        update = UpdateResult(loss=0.0, clip_frac=0.0, entropy=float("nan"), kept_tokens=0.0, trained_tokens=0.0,
                              packed_tokens=0.0, logprob_drift=None, grad_norm=0.0, stepped=False)
        skip = f"critic warm-up (step {step} < critic.warmup_steps={critic.warmup_steps})"
    else:
        skip = None
        scores = _Scores(advantages, token_adv, old_cond, policy_fn, ref_logprobs_fn)
        update = _policy_updates(updater, samples, phase, scores, groups, lr=lr, packing=packing, options=options,
                                 metrics=metrics)
    if critic is not None:
        assert returns is not None and values is not None
        metrics["explained_variance"] = _explained_variance(returns, values)
        metrics["value_mean"] = token_mean(list(values))
        metrics.update(_critic_update(critic, samples, groups, options, returns, values, max_tokens=max_tokens,
                                      prefix=marginal_prefix, device=device))
    return BatchResult(advantages, update, metrics, skip)


def _policy_updates(updater: Updater, samples: StepSamples, phase: Phase, scores: _Scores, groups: list[list[int]], *,
                    lr: float, packing: Packing, options: UpdateOptions, metrics: dict[str, Any]) -> UpdateResult:
    """The `mini_batches × epochs` optimizer steps of the policy (old log-probs first when they are needed); groups:
    each mini-batch's sample indices (mini_batch_groups); metrics: gets "updates" (and the marginal log-prob)."""
    marginal_prefix, max_tokens, device = packing.marginal_prefix, packing.max_tokens, packing.device
    advantages, token_adv, old_cond, policy_fn = scores.advantages, scores.token_adv, scores.old_cond, scores.policy_fn
    n = len(samples.response_ids)
    lengths = [len(r) for r in samples.response_ids]
    conditional = phase.space == "conditional"
    old: list[torch.Tensor] | None = None
    if options.old_logprobs == "sampler" and conditional:
        old = [torch.tensor(lp, dtype=torch.float32, device=device) for lp in samples.sampler_logprobs]
    elif options.updates > 1 or (options.marginal_logprob and not conditional):
        if old_cond is not None and conditional:
            old = old_cond
        else:
            _, trained = update_samples(advantages, phase, token_adv)
            scored = score(packed_micro_batches(samples, trained, phase.space, max_tokens, marginal_prefix), policy_fn, n,
                            device)
            if not conditional:
                metrics["marginal_logprob_mean"] = token_mean(scored)
            old = filled(scored, lengths, device)
    loss_ref = scores.ref_logprobs_fn if phase.loss.kl_coef != 0 else None
    results = []
    for _ in range(options.epochs):
        for chunk in groups:
            extra: dict[str, Any] = {}
            if old is not None:
                extra["old_logprobs"] = [old[i] for i in chunk]
            if token_adv is not None:
                extra["token_advantages"] = [token_adv[i] for i in chunk]
            sub = samples if len(chunk) == n else subset(samples, chunk)
            results.append(run_update(updater, sub, advantages[chunk], phase, marginal_prefix=marginal_prefix,
                                     max_tokens=max_tokens, device=device, lr=lr, ref_logprobs_fn=loss_ref, **extra))
    metrics["updates"] = sum(r.stepped for r in results)
    return _merge(results, options.epochs)
