"""Verifiable math rewards: the last ``\\boxed{...}`` of a response checked against a reference.

A reward function maps ``(responses: list[str], references: list[str]) -> list[float]``: one score per
response, 1.0 when its final boxed answer matches the reference, else 0.0. Missing or malformed answers,
checks past their time limit and crashed checks score 0.0 and never raise.

Rewards, by :func:`get_reward_fn` spec (the config key ``reward``):

- ``"math_verify"`` (:class:`MathVerifyReward`): mathematical equivalence by math-verify (sympy), in worker
  processes under a hard per-check time limit, after an exact fast path. It accepts more answers than
  ``hendrycks_math`` (``0.25`` = ``\\frac{1}{4}``, ``27.0`` = ``27``, ``x^2+2x+1`` = ``(x+1)^2``), so fewer
  samples are negative.
- ``"hendrycks_math"`` (:class:`HendrycksMathReward`): the MATH dataset's published string-equivalence check,
  which the paper's authors trained with. The presets use it to reproduce their setup.
- ``"exact_match"``: :func:`exact_match_reward`, normalized string or exact number equality (the toy task).
- ``"package.module:function"``: any importable callable with the signature above (an attribute path after the
  colon is allowed: ``"pkg.mod:obj.method"``). Its output is checked on every call (one finite float per
  response).

**Outcome counts for metrics.** The built-in rewards set ``last_stats``, a :class:`RewardStats` of their last
call: ``no_answer`` (no complete final box, an empty or over-long one, or an answer the checker cannot read),
``reward_timeouts`` (checks killed at the time limit) and ``reward_errors`` (checks that raised or crashed their
worker twice, references the checker cannot read), plus ``responses`` and ``correct``. :func:`reward_stats`
returns it for any reward function (None for one that does not count), and ``RewardStats.metrics()`` gives the
three step metrics. The trainer logs them every step.

**Process pool.** math-verify runs in our own :class:`CheckPool` (one pipe per worker, SIGKILL at the deadline,
dead-worker detection before dispatch, one retry after a crash, start-up time limit and bounded start retries),
not pebble's ``ProcessPool``: see :mod:`dsrl_fast.reward.pool` for why and for the exact guarantees.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Any

from dsrl_fast.reward.base import MalformedAnswer, Outcome, RewardFn, RewardStats, check_batch, reward_stats
from dsrl_fast.reward.extract import MAX_ANSWER_CHARS, extract_boxed
from dsrl_fast.reward.hendrycks import HendrycksMathReward, hendrycks_equiv, hendrycks_normalize
from dsrl_fast.reward.normalize import (
    answers_match_fast,
    canonical_decimal,
    exact_match_reward,
    normalize_answer,
    normalize_unicode,
)
from dsrl_fast.reward.pool import CheckPool
from dsrl_fast.reward.verify import MathVerifyReward, math_verify_check

__all__ = [
    "MAX_ANSWER_CHARS",
    "REWARD_NAMES",
    "CheckPool",
    "HendrycksMathReward",
    "MalformedAnswer",
    "MathVerifyReward",
    "Outcome",
    "RewardFn",
    "RewardStats",
    "answers_match_fast",
    "canonical_decimal",
    "check_reward_spec",
    "exact_match_reward",
    "extract_boxed",
    "get_reward_fn",
    "hendrycks_equiv",
    "hendrycks_normalize",
    "math_verify_check",
    "normalize_answer",
    "normalize_unicode",
    "register_reward_fn",
    "reward_stats",
]

_REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "math_verify": MathVerifyReward,
    "hendrycks_math": HendrycksMathReward,
    "exact_match": lambda: exact_match_reward,
}
REWARD_NAMES = tuple(_REGISTRY)
_IMPORT_SPEC_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", re.ASCII)


def register_reward_fn(name: str, factory: Callable[..., RewardFn]) -> None:
    """Make ``get_reward_fn(name, **kwargs)`` return ``factory(**kwargs)``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name must be a non-empty str without ':', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def check_reward_spec(spec: str, *, load: bool = False) -> None:
    """ValueError unless ``spec`` is a registered name or of the form ``module:function``; TypeError unless it is a
    str. With ``load`` a ``module:function`` spec is also imported and must name a callable (ValueError)."""
    if not isinstance(spec, str):
        raise TypeError(f"reward must be a str, got {type(spec).__name__}")
    if not (spec in _REGISTRY or _IMPORT_SPEC_RE.fullmatch(spec)):
        raise ValueError(
            f"reward must be one of {sorted(_REGISTRY)} or 'package.module:function', got {spec!r}"
        )
    if load and spec not in _REGISTRY:
        _load(spec)


class _CheckedRewardFn:
    """A user reward whose output is validated on every call (one finite float per response)."""

    def __init__(self, fn: Callable[[list[str], list[str]], Any], spec: str):
        self.fn, self.spec = fn, spec

    @property
    def last_stats(self) -> RewardStats | None:
        return reward_stats(self.fn)

    def __call__(self, responses: list[str], references: list[str]) -> list[float]:
        check_batch(responses, references)
        scores = self.fn(list(responses), list(references))
        if not isinstance(scores, (list, tuple)) or len(scores) != len(responses):
            got = f"{len(scores)} items" if isinstance(scores, (list, tuple)) else type(scores).__name__
            raise ValueError(f"reward {self.spec!r} must return a list of {len(responses)} floats, got {got}")
        out = []
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"reward {self.spec!r} returned {s!r} at index {i}; scores must be finite floats")
            out.append(float(s))
        return out

    def close(self) -> None:
        close = getattr(self.fn, "close", None)
        if close is not None:
            close()


def _load(spec: str) -> Callable[[list[str], list[str]], Any]:
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"reward {spec!r} must name a callable, got {type(obj).__name__}")
    return obj


def get_reward_fn(spec: str = "math_verify", **kwargs: Any) -> RewardFn:
    """The reward function named by ``spec``: a registered name (``kwargs`` go to its factory) or
    ``"module:function"`` (loaded as is; ``kwargs`` must be empty), wrapped to validate its output."""
    check_reward_spec(spec)
    if spec in _REGISTRY:
        return _REGISTRY[spec](**kwargs)
    if kwargs:
        raise ValueError(f"reward {spec!r} is loaded as is and takes no arguments, got {sorted(kwargs)}")
    return _CheckedRewardFn(_load(spec), spec)
