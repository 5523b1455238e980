"""The algorithm and guard sections of a run's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsrl_fast.loss.config import AGGREGATIONS, KL_TYPES
from dsrl_fast.rl.algorithms import ALGORITHMS, CONDITIONAL_ALGORITHMS
from dsrl_fast.typed_config import Section, check_choice, check_max, check_min

MARGINAL_ADVANTAGES = ("mean", "grpo")
GUARD_ACTIONS = ("switch", "stop")

@dataclass
class AlgoConfig(Section):
    """The update rule (see dsrl_fast.rl.algorithms for what each algo does).

    Attributes:
        algo: "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo" (with a critic, see
            the critic section), "prerl", "nsr_prerl", "psr_prerl", "nsr_rl", "psr_rl" or "dsrl".
        switch_step: dsrl runs NSR-PreRL on steps [0, switch_step) and after_switch from then on (0 = after_switch
            only; >= steps = NSR-PreRL only). The default 19 is what the authors' code does for the paper's S = 20:
            its steps count from 1 and PreRL runs while step < 20, i.e. 19 marginal updates. The guard section can
            end the marginal phase earlier; the step actually used is logged as switch_step.
        after_switch: the conditional algorithm dsrl switches to: "grpo" (the paper) or any conditional algo
            ("ppo" trains its critic from step 0, on the conditional space, during the marginal phase too).
        marginal_prefix: token ids put before a response to score its marginal log-prob; null resolves to the
            tokenizer's ``<|im_start|>`` id when it has one, else its BOS id.
        pretrain_loss_coef: multiplies the marginal (PreRL) loss (the authors use 0.01).
        marginal_advantage: marginal-phase advantage: "mean" (r - group mean, as the authors) or "grpo"
            (std-normalized).
        clip_low: PPO clip ε_low, in [0, 1).
        clip_high: PPO clip ε_high; null takes the algo default (0.28 for dapo, else 0.2).
        clip_ratio_c: dual-clip constant (> 1); null disables dual clipping.
        agg: loss aggregation (see dsrl_fast.loss.config.AGGREGATIONS); null takes the algo default
            ("seq-mean-token-sum-norm" for dr_grpo, else "token-mean").
        kl_coef: weight of the KL penalty to the reference policy (0 disables it and the reference model).
        kl_type: KL estimator: "k1", "k2" or "k3".
        entropy_coef: weight of the entropy bonus.
        kl_in_reward_coef: β of a k1 KL penalty folded into the reward on conditional steps (verl's
            use_kl_in_reward): each response token gets -β·(log π_old - log π_ref); sample estimators take each
            response's summed reward, reinforce_pp the per-token returns, ppo the GAE rewards. 0 disables it.
        gae_gamma: PPO's GAE discount γ in [0, 1].
        gae_lambda: PPO's GAE λ in [0, 1] (1 with γ = 1: advantages are return minus value).
    """

    SECTION: ClassVar[str] = "algo"

    algo: str = "dsrl"
    switch_step: int = 19
    marginal_prefix: tuple[int, ...] | None = None
    pretrain_loss_coef: float = 0.01
    marginal_advantage: str = "mean"
    clip_low: float = 0.2
    clip_high: float | None = None
    clip_ratio_c: float | None = 10.0
    agg: str | None = None
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    after_switch: str = "grpo"
    kl_in_reward_coef: float = 0.0
    gae_gamma: float = 1.0
    gae_lambda: float = 0.95

    def _check(self) -> None:
        check_choice(self.key("algo"), self.algo, ALGORITHMS)
        check_choice(self.key("after_switch"), self.after_switch, CONDITIONAL_ALGORITHMS)
        self._min("kl_in_reward_coef", 0.0)
        for name in ("gae_gamma", "gae_lambda"):
            self._min(name, 0.0)
            check_max(self.key(name), getattr(self, name), 1.0)
        self._min("switch_step", 0)
        if self.marginal_prefix is not None:
            if not self.marginal_prefix:
                raise ValueError(f"{self.key('marginal_prefix')} must be a non-empty list of token ids or null, "
                                 f"got {list(self.marginal_prefix)}")
            for i, token in enumerate(self.marginal_prefix):
                check_min(f"{self.key('marginal_prefix')}[{i}]", token, 0)
        self._min("pretrain_loss_coef", 0.0, strict=True)
        check_choice(self.key("marginal_advantage"), self.marginal_advantage, MARGINAL_ADVANTAGES)
        self._min("clip_low", 0.0)
        check_max(self.key("clip_low"), self.clip_low, 1.0, strict=True)
        self._min("clip_high", 0.0)
        self._min("clip_ratio_c", 1.0, strict=True)
        if self.agg is not None:
            check_choice(self.key("agg"), self.agg, AGGREGATIONS)
        self._min("kl_coef", 0.0)
        check_choice(self.key("kl_type"), self.kl_type, KL_TYPES)


@dataclass
class GuardConfig(Section):
    """A guard of the marginal phase (dsrl_fast.rl.guard): when a limit is crossed on `patience` consecutive
    marginal steps, dsrl switches to the conditional phase from the next step, or the run stops (every limit null:
    off, the paper's run).

    Attributes:
        max_response_len: limit of the step's mean response length in tokens.
        max_truncated_share: limit of the share of responses cut at rollout.max_response_len, in (0, 1].
        max_logprob_drift: limit of |mean marginal log-prob per token of the scored responses - its value at the
            first marginal step|, in nats (costs one no-grad marginal pass per marginal step).
        patience: consecutive marginal steps over a limit before the guard acts.
        action: "switch" (dsrl only: the next step is the first of algo.after_switch) or "stop" (end the run after
            this step with the final evaluation, checkpoint and plot; dsrl, prerl, nsr_prerl or psr_prerl).
    """

    SECTION: ClassVar[str] = "guard"

    max_response_len: float | None = None
    max_truncated_share: float | None = None
    max_logprob_drift: float | None = None
    patience: int = 1
    action: str = "switch"

    def _check(self) -> None:
        check_choice(self.key("action"), self.action, GUARD_ACTIONS)
        for name in ("max_response_len", "max_truncated_share", "max_logprob_drift"):
            self._min(name, 0.0, strict=True)
        check_max(self.key("max_truncated_share"), self.max_truncated_share, 1.0)
        self._min("patience", 1)

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.max_response_len, self.max_truncated_share, self.max_logprob_drift))
