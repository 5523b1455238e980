"""Training curves from a metrics.jsonl file: reward (and the sampled accuracy where it differs), held-out accuracy
and pass@k, response length and truncated share, thought shares (where any is non-zero), loss, gradient norm and
learning rate per step, with the switch from the marginal to the conditional phase marked."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dsrl_fast.train.metrics_log import read_metrics

__all__ = ["moving_average", "panels_of", "plot_metrics"]

# (y label, metric keys) of each panel, in order; a panel is drawn when any of its keys has a value (see panels_of
# for the keys left out because they repeat another curve or carry no signal).
_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("training reward", ("reward_mean", "accuracy")),
    ("held-out accuracy", ("eval_accuracy_before", "eval_accuracy", "eval_accuracy_after")),
    ("response length (tokens)", ("response_len_mean",)),
    ("share of responses cut by the length cap", ("truncated_share",)),
    ("share of reasoning steps", ("transition_share", "reflection_share")),
    ("loss", ("loss",)),
    ("gradient norm", ("grad_norm",)),
    ("learning rate", ("lr",)),
)
# Schedules, not noisy measurements: drawn as they are, without a moving average.
_EXACT = frozenset({"lr"})
# Held-out accuracy measured before RL, every eval_every steps and after RL, drawn as one line: (key, x shift). The
# record before RL belongs to step 0 but was measured before it: it is drawn at step -1.
_HELD_OUT = (("eval_accuracy_before", -1), ("eval_accuracy", 0), ("eval_accuracy_after", 0))
# The same three sources of a held-out pass@k: "<prefix>held_out/pass@<k>".
_HELD_OUT_PREFIXES = (("eval_before/", -1), ("eval/", 0), ("eval_after/", 0))
_PASS_AT = "held_out/pass@"
# Metrics that only count when some value is non-zero (the toy's responses have no reasoning steps to classify).
_SIGNAL_ONLY = frozenset({"transition_share", "reflection_share", "truncated_share"})
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
_MARGINAL_NAMES = {"negative": "NSR-PreRL", "positive": "PSR-PreRL", "all": "PreRL"}
_CONDITIONAL_NAMES = {"negative": "NSR-RL", "positive": "PSR-RL", "all": "GRPO"}
_ALGO_NAMES = {"grpo": "GRPO", "dr_grpo": "Dr.GRPO", "dapo": "DAPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++",
               "reinforce_pp_baseline": "REINFORCE++-baseline", "ppo": "PPO",
               "prerl": "PreRL", "nsr_prerl": "NSR-PreRL", "psr_prerl": "PSR-PreRL", "nsr_rl": "NSR-RL",
               "psr_rl": "PSR-RL"}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` points (fewer at the start). values: (T,) float -> (T,) float64."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    values = np.asarray(values, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def _merge_steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, sorted by step: records of the same step (training metrics, then an evaluation) are
    merged, later values winning (a resumed run without truncation rewrote them)."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            by_step.setdefault(step, {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _held_out_points(rows: list[dict[str, Any]], sources: tuple[tuple[str, int], ...] = _HELD_OUT
                     ) -> list[tuple[float, float, str]]:
    """(x, value, key) of every held-out measurement of `sources` ((key, x shift) each), by x."""
    points = []
    for key, shift in sources:
        steps, values = _series(rows, key)
        points += [(float(x) + shift, float(v), key) for x, v in zip(steps, values)]
    return sorted(points)


def _largest_pass_k(rows: list[dict[str, Any]]) -> int | None:
    """The largest k > 1 of a logged held-out pass@k (None without one: with eval_n 1, pass@1 is the accuracy)."""
    ks = {int(key.rpartition("@")[2]) for row in rows for key in row
          if key.startswith(tuple(prefix + _PASS_AT for prefix, _ in _HELD_OUT_PREFIXES))
          and key.rpartition("@")[2].isdigit()}
    ks.discard(1)
    return max(ks) if ks else None


def _draw_held_out(ax: Any, rows: list[dict[str, Any]], color: str, pass_color: str) -> None:
    """Every held-out accuracy measured as one line, the first (before RL) and last (after RL) points labelled, and
    the held-out pass@k of the largest k logged as a second line."""
    k = _largest_pass_k(rows)
    if k is not None:
        sources = tuple((f"{prefix}{_PASS_AT}{k}", shift) for prefix, shift in _HELD_OUT_PREFIXES)
        passes = _held_out_points(rows, sources)
        ax.plot([p[0] for p in passes], [p[1] for p in passes], "s--", color=pass_color, markersize=4,
                label=f"held-out pass@{k}")
    points = _held_out_points(rows)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.plot(xs, ys, "o-", color=color, markersize=4, label="held-out accuracy")
    first, last = points[0], points[-1]
    if first[2] == "eval_accuracy_before":
        ax.annotate(f"before RL {first[1]:.3f}", (first[0], first[1]), textcoords="offset points", xytext=(4, 6),
                    fontsize=8)
    if last[2] == "eval_accuracy_after":
        ax.annotate(f"after RL {last[1]:.3f}", (last[0], last[1]), textcoords="offset points", xytext=(-4, 6),
                    fontsize=8, ha="right")


def _repeats_reward(rows: list[dict[str, Any]]) -> bool:
    """True when the logged sampled accuracy equals the mean reward at every step (a 0/1 reward)."""
    return all(r["accuracy"] == r.get("reward_mean") for r in rows if "accuracy" in r)


def panels_of(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(y label, metric keys) of each panel the rows have values for, in drawing order. Left out: the sampled
    accuracy where it equals the reward at every step (a 0/1 reward: the same curve), and the thought and truncated
    shares where every value is 0 (no signal, e.g. the toy's one-line answers)."""
    def shown(key: str) -> bool:
        steps, values = _series(rows, key)
        if not steps.size or (key in _SIGNAL_ONLY and not values.any()):
            return False
        return key != "accuracy" or not _repeats_reward(rows)

    panels = [(ylabel, [k for k in keys if shown(k)]) for ylabel, keys in _PANELS]
    return [p for p in panels if p[1]]


def _phase_name(row: dict[str, Any] | None, marginal: bool) -> str:
    """The phase's name from the row's `algo` (the rule in force), else from its `samples`."""
    row = row or {}
    samples = row.get("samples", "negative" if marginal else "all")
    names = _MARGINAL_NAMES if marginal else _CONDITIONAL_NAMES
    name = _ALGO_NAMES.get(row.get("algo"), names.get(samples, "PreRL" if marginal else "RL"))
    return f"{name} ({'marginal' if marginal else 'conditional'})"


def _find_switch(rows: list[dict[str, Any]]) -> int | None:
    """First step whose `space` differs from the previous logged step's."""
    spaced = [r for r in rows if isinstance(r.get("space"), str)]
    for prev, cur in itertools.pairwise(spaced):
        if cur["space"] != prev["space"]:
            return cur["step"]
    return None


def _logged_switch(rows: list[dict[str, Any]]) -> tuple[int | None, str | None]:
    """(switch step, guard note) from the logged `switch_step` (dsrl's switch actually used: the last value wins).
    The note says when the marginal-phase guard moved the switch earlier than planned, and why."""
    logged = [r for r in rows if isinstance(r.get("switch_step"), int) and not isinstance(r.get("switch_step"), bool)]
    if not logged:
        return None, None
    planned, used = logged[0]["switch_step"], logged[-1]["switch_step"]
    if used == planned:
        return used, None
    reasons = [r["guard"] for r in rows if r.get("step") == used - 1 and isinstance(r.get("guard"), str)]
    why = f": {reasons[0]}" if reasons else ""
    return used, f"guard switched at step {used} instead of {planned}{why}"


def _phase_labels(rows: list[dict[str, Any]], switch: int) -> tuple[str, str]:
    before = [r for r in rows if r["step"] < switch and isinstance(r.get("space"), str)]
    after = [r for r in rows if r["step"] >= switch and isinstance(r.get("space"), str)]
    first = _phase_name(before[-1], before[-1]["space"] == "marginal") if before else _phase_name(None, True)
    second = _phase_name(after[0], after[0]["space"] == "marginal") if after else _phase_name(None, False)
    return first, second


def plot_metrics(metrics_path: str | os.PathLike[str], out_png: str | os.PathLike[str], *,
                 switch_step: int | None = None, window: int = 10) -> str:
    """Draw the run's curves to a PNG and return its path.

    Panels (each only when its metrics are present, see panels_of): reward (raw, faint, and its trailing moving
    average over `window` steps) with the sampled accuracy where it differs, held-out accuracy and pass@k of the
    largest k logged (one line each through every measurement: before RL, drawn at step -1, each periodic
    evaluation and after RL), response length, share of truncated responses, transition/reflection thought shares,
    loss, gradient norm, learning rate. The marginal phase is shaded and the switch between phases
    (`switch_step`, or the first step where the logged `space` changes) is a dashed vertical line, with the two
    phases labelled ("NSR-PreRL (marginal)" / "GRPO (conditional)", named from the logged `space` and `samples`);
    a switch outside (first logged step, last logged step] is not drawn. Without `switch_step` the switch is the
    last logged `switch_step` metric (the one a dsrl run actually used; the title says when its guard moved it, and
    why), else the first change of `space`. Records of the same step are merged.
    Raises FileNotFoundError for a missing file and ValueError for a file without any step record.
    """
    if switch_step is not None and (isinstance(switch_step, bool) or not isinstance(switch_step, int)):
        raise TypeError(f"switch_step must be an int or None, got {type(switch_step).__name__}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics_path {str(path)!r} is not a file")
    rows = _merge_steps(read_metrics(path))
    if not rows:
        raise ValueError(f"metrics_path {str(path)!r} holds no record with an integer 'step'")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    first_step, last_step = rows[0]["step"], rows[-1]["step"]
    logged_switch, guard_note = _logged_switch(rows)
    switch = switch_step if switch_step is not None else logged_switch if logged_switch is not None else \
        _find_switch(rows)
    if switch is not None and not first_step < switch <= last_step:
        switch = None  # a single-phase run (switch at 0, or after the last logged step)
    panels = panels_of(rows)
    columns = 2 if len(panels) > 4 else 1
    rows_of_panels = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(10 if columns == 1 else 16, 2.6 * rows_of_panels + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    span = f"step {first_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
    fig.suptitle(f"{path.parent.name}/{path.name}: {span}, moving averages over {window} steps", fontsize=11)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no plottable metrics (reward_mean, accuracy, response_len_mean, *_share)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    grid = fig.subplots(rows_of_panels, columns, sharex=True, squeeze=False) if panels else None
    axes: list[Any] = list(grid.flatten()[:len(panels)]) if grid is not None else []
    for spare in (grid.flatten()[len(panels):] if grid is not None else []):
        spare.set_axis_off()
    labels = _phase_labels(rows, switch) if switch is not None else None
    for i, (ax, (ylabel, keys)) in enumerate(zip(axes, panels)):
        if ylabel == "held-out accuracy":
            _draw_held_out(ax, rows, _COLORS[0], _COLORS[1])
            keys = []
        for color, key in zip(_COLORS, keys):
            steps, values = _series(rows, key)
            sparse = steps.size < 0.5 * len(rows)
            if key in _EXACT:
                ax.step(steps, values, where="post", color=color, linewidth=1.5, label=key)
                continue
            if sparse or steps.size == 1:
                ax.plot(steps, values, "o-", color=color, markersize=4, label=key)
                continue
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8, label=f"{key} (raw)")
            ax.plot(steps, moving_average(values, window), color=color, linewidth=2.0, label=f"{key} (MA {window})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if labels is not None:
            top = i == 0
            # the boundary lies between steps switch - 1 and switch
            ax.axvspan(first_step - 0.5, switch - 0.5, color="tab:purple", alpha=0.12, linewidth=0,
                       label=f"{labels[0]}: steps < {switch}" if top else None)
            ax.axvline(switch - 0.5, color="black", linestyle="--", linewidth=1.2,
                       label=f"{labels[1]}: from step {switch}" if top else None)
            if top:
                note = f"\n{guard_note}" if guard_note else ""
                ax.set_title(f"{labels[0]} for steps < {switch}  |  {labels[1]} from step {switch} (dashed line)"
                             f"{note}", fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="best", ncol=2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(axes):
        for ax in axes[-columns:]:
            ax.set_xlabel("step")
            ax.xaxis.set_tick_params(labelbottom=True)
        pad = 0.5 if last_step > first_step else 1.0
        held_out = _held_out_points(rows)
        left = min(first_step, held_out[0][0]) if held_out else first_step
        axes[-1].set_xlim(left - pad, last_step + pad)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return str(out)
