"""What each `algo=` does at a given step: which space is scored, which samples update, which advantages, which loss.

| algo                  | space       | samples  | advantages                                             |
|-----------------------|-------------|----------|--------------------------------------------------------|
| grpo                  | conditional | all      | (r - mean) / std                                       |
| dr_grpo               | conditional | all      | r - mean (Dr.GRPO agg)                                 |
| dapo                  | conditional | all      | (r - mean) / std, ε_high .28                           |
| rloo                  | conditional | all      | leave-one-out                                          |
| reinforce_pp          | conditional | all      | whitened over the global batch                         |
| reinforce_pp_baseline | conditional | all      | r - group mean, then whitened over the global batch    |
| ppo                   | conditional | all      | GAE(γ, λ) from a critic, whitened over the global batch |
| nsr_rl/psr_rl         | conditional | neg/pos  | (r - mean) / std                                       |
| prerl                 | marginal    | all      | r - mean (authors)                                     |
| nsr_prerl             | marginal    | negative | r - mean                                               |
| psr_prerl             | marginal    | positive | r - mean                                               |
| dsrl                  | nsr_prerl for steps < switch_step, then `after_switch` (grpo by default)        |

Marginal phases scale the loss by `pretrain_loss_coef` and may use their own learning rate (`optim.marginal_lr`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsrl_fast.loss.config import PolicyLossConfig

ALGORITHMS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo", "prerl", "nsr_prerl",
              "psr_prerl", "nsr_rl", "psr_rl", "dsrl")

# algo -> (space, samples, conditional-space advantage estimator)
_TABLE: dict[str, tuple[str, str, str]] = {
    "grpo": ("conditional", "all", "grpo"),
    "dr_grpo": ("conditional", "all", "dr_grpo"),
    "dapo": ("conditional", "all", "grpo"),
    "rloo": ("conditional", "all", "rloo"),
    "reinforce_pp": ("conditional", "all", "reinforce_pp"),
    "reinforce_pp_baseline": ("conditional", "all", "reinforce_pp_baseline"),
    "ppo": ("conditional", "all", "gae"),
    "nsr_rl": ("conditional", "negative", "grpo"),
    "psr_rl": ("conditional", "positive", "grpo"),
    "prerl": ("marginal", "all", ""),
    "nsr_prerl": ("marginal", "negative", ""),
    "psr_prerl": ("marginal", "positive", ""),
}
# The rules dsrl may switch to (algo.after_switch): every conditional one.
CONDITIONAL_ALGORITHMS = tuple(a for a, (space, _, _) in _TABLE.items() if space == "conditional")


@dataclass(frozen=True)
class Phase:
    """The update rule of one step.

    algo: the rule in force (dsrl resolves to nsr_prerl or grpo). space: "marginal" or "conditional".
    samples: "all", "negative" or "positive". estimator: advantage estimator name (dsrl_fast.rl.advantages), or "gae"
    (PPO: per-token GAE from the critic's values).
    loss: the policy-loss options. lr: learning rate before the schedule factor.
    """

    algo: str
    space: str
    samples: str
    estimator: str
    loss: PolicyLossConfig
    lr: float


def resolve_algo(algo: str, step: int, switch_step: int, after_switch: str = "grpo") -> str:
    """The table algorithm in force at `step` (dsrl switches from nsr_prerl to `after_switch` at switch_step)."""
    if algo not in ALGORITHMS:
        raise ValueError(f"algo must be one of {ALGORITHMS}, got {algo!r}")
    if after_switch not in CONDITIONAL_ALGORITHMS:
        raise ValueError(f"after_switch must be one of {CONDITIONAL_ALGORITHMS}, got {after_switch!r}")
    if algo == "dsrl":
        return "nsr_prerl" if step < switch_step else after_switch
    return algo


def uses_critic(algo: str, after_switch: str = "grpo") -> bool:
    """True when the run trains a critic: PPO, or dsrl switching to PPO (its critic learns during the marginal
    phase too, on the conditional space)."""
    return algo == "ppo" or (algo == "dsrl" and after_switch == "ppo")


def phase_for_step(step: int, *, algo: str, switch_step: int, lr: float, marginal_lr: float | None,
                   clip_low: float, clip_high: float | None, clip_ratio_c: float | None, agg: str | None,
                   pretrain_loss_coef: float, marginal_advantage: str, kl_coef: float, kl_type: str,
                   entropy_coef: float, temperature: float, max_response_len: int,
                   after_switch: str = "grpo") -> Phase:
    """The Phase of `step` for the given algorithm options (see the module table)."""
    rule = resolve_algo(algo, step, switch_step, after_switch)
    space, samples, estimator = _TABLE[rule]
    marginal = space == "marginal"
    if marginal:
        estimator = "marginal" if marginal_advantage == "mean" else "grpo"
    default_agg = "seq-mean-token-sum-norm" if rule == "dr_grpo" else "token-mean"
    loss = PolicyLossConfig(
        clip_low=clip_low,
        clip_high=(0.28 if rule == "dapo" else 0.2) if clip_high is None else clip_high,
        clip_ratio_c=clip_ratio_c,
        temperature=temperature,
        samples="all",  # the trainer drops filtered samples before packing; see Phase.samples
        agg=agg or default_agg,
        loss_scale=pretrain_loss_coef if marginal else 1.0,
        max_response_len=max_response_len,
        kl_coef=kl_coef,
        kl_type=kl_type,
        entropy_coef=entropy_coef,
    )
    return Phase(rule, space, samples, estimator, loss, marginal_lr if marginal and marginal_lr else lr)
