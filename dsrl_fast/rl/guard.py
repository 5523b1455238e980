"""A guard for the marginal (pre-train space) phase: switch to the conditional phase early (or stop) when it collapses.

NSR on the marginal log-prob is fragile: the paper notes NSR-PreRL "eventually leads to excessively long outputs",
and on the toy task NSR at lr 1e-4 drove every response to the length cap within 20-30 steps (DESIGN §5). The guard
watches three signals of each marginal step, global over ranks:

- the mean response length (tokens),
- the share of truncated responses (those that hit rollout.max_response_len without finishing),
- the drift of the mean per-token marginal log-prob of the scored responses from its value at the first marginal
  step (nats per token, absolute).

When any signal is over its threshold for `patience` consecutive marginal steps, the phase ends: the next step is
the first conditional one (guard.action "switch"), or the run ends after this step ("stop"). The switch step actually
used, and why, is part of the trainer's checkpointed state, so a resumed run keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsrl_fast.rollout.base import Rollout
from dsrl_fast.distributed import reduce_floats
from dsrl_fast.rl.config import GuardConfig

__all__ = ["GuardDecision", "GuardSignals", "MarginalGuard", "guard_signals"]


@dataclass(frozen=True)
class GuardSignals:
    """One marginal step's global figures: mean response length, truncated share, mean marginal log-prob per token
    (None when the step scored no token)."""

    response_len_mean: float
    truncated_share: float
    marginal_logprob_mean: float | None


@dataclass(frozen=True)
class GuardDecision:
    """switch: the marginal phase ends after this step. reason: which limit was crossed (None when none was).
    logprob_drift: this step's drift (None before a baseline exists)."""

    switch: bool
    reason: str | None
    logprob_drift: float | None


@dataclass
class MarginalGuard:
    """The guard's state over a run (limits: the guard config section): the log-prob baseline and the count of
    consecutive steps over a limit."""

    limits: GuardConfig
    baseline_logprob: float | None = None
    strikes: int = 0

    def observe(self, signals: GuardSignals) -> GuardDecision:
        """Record one marginal step; says whether the phase must end after it."""
        lim = self.limits
        drift = None
        if signals.marginal_logprob_mean is not None:
            if self.baseline_logprob is None:
                self.baseline_logprob = signals.marginal_logprob_mean
            drift = abs(signals.marginal_logprob_mean - self.baseline_logprob)
        crossed = []
        if lim.max_response_len is not None and signals.response_len_mean > lim.max_response_len:
            crossed.append(f"mean response length {signals.response_len_mean:.1f} > {lim.max_response_len:g} tokens")
        if lim.max_truncated_share is not None and signals.truncated_share > lim.max_truncated_share:
            crossed.append(f"truncated share {signals.truncated_share:.3f} > {lim.max_truncated_share:g}")
        if lim.max_logprob_drift is not None and drift is not None and drift > lim.max_logprob_drift:
            crossed.append(f"marginal log-prob drift {drift:.3f} > {lim.max_logprob_drift:g} nats/token")
        self.strikes = self.strikes + 1 if crossed else 0
        switch = bool(crossed) and self.strikes >= lim.patience
        return GuardDecision(switch, "; ".join(crossed) if crossed else None, drift)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state (for the trainer's checkpoint)."""
        return {"baseline_logprob": self.baseline_logprob, "strikes": self.strikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline_logprob = state.get("baseline_logprob")
        self.strikes = int(state.get("strikes", 0))


def guard_signals(rollouts: Sequence[Rollout], metrics: Mapping[str, Any]) -> GuardSignals:
    """The guard's view of a step: this rank's rollouts (truncated = not finished, summed over ranks) and the step's
    global metrics ``response_len_mean`` and ``marginal_logprob_mean`` (absent: None)."""
    truncated, count = reduce_floats([float(sum(not r.finished for r in rollouts)), float(len(rollouts))])
    return GuardSignals(float(metrics["response_len_mean"]), truncated / max(count, 1.0),
                        metrics.get("marginal_logprob_mean"))
