"""What a run leaves for later reading besides its per-step metrics: the evaluations before and after RL as
metrics.jsonl records, summary.json, the plot, and what is still written when the run fails on a full disk."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from dsrl_fast.train.checkpoint import latest_checkpoint
from dsrl_fast.train.metrics_log import print0, write_summary
from dsrl_fast.train.plot import plot_metrics

__all__ = ["end_failed_run", "final_eval_record", "pass_at_k_table", "print_outputs", "write_plot",
           "write_run_summary"]


def final_eval_record(stage: str, accuracy: float | None, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics.jsonl record of the evaluation `stage` ("before" / "after" RL): eval_accuracy_<stage> and every
    eval/<task>/<metric> as eval_<stage>/<task>/<metric>."""
    record = {f"eval_{stage}/{k.removeprefix('eval/')}": v for k, v in metrics.items()}
    if accuracy is not None:
        record[f"eval_accuracy_{stage}"] = accuracy
    return record


def pass_at_k_table(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Lines of a compact table per evaluated set: its pass@k (k = 1, 2, 4, ...) before and after RL, as fractions.

    before, after: the "eval/<set>/<metric>" dicts of the evaluations before and after RL (either may be empty, a
    resumed run has no "before"); sets with only pass@1 (eval_n 1: pass@1 is the accuracy) are left out.
    """
    lines = []
    for task in dict.fromkeys(k.split("/")[1] for k in (*before, *after) if k.count("/") == 2):
        ks = sorted({int(k.rpartition("@")[2]) for k in (*before, *after)
                     if k.startswith(f"eval/{task}/pass@") and k.rpartition("@")[2].isdigit()})
        if len(ks) < 2:
            continue
        width = max(5, *(len(f"pass@{k}") for k in ks))
        lines.append(f"{task + ':':<12}" + " ".join(f"{f'pass@{k}':>{width}}" for k in ks))
        for label, values in (("before RL", before), ("after RL", after)):
            cells = [values.get(f"eval/{task}/pass@{k}") for k in ks]
            if any(c is not None for c in cells):
                lines.append(f"  {label:<10}" + " ".join("n/a".rjust(width) if c is None else f"{c:>{width}.3f}"
                                                         for c in cells))
    return lines


def write_run_summary(out: Path, rank: int, status: str, state: dict[str, Any], seconds: float,
                      **fields: Any) -> Path | None:
    """Rank 0 writes summary.json: the run's status, the warm-up's steps and last check accuracy (None without a
    warm-up or a check), before-RL accuracy and eval metrics, the newest checkpoint, and `fields`; returns its path. A failure to write it is printed, not raised (it must not hide the run's own
    error)."""
    if rank != 0:
        return None
    latest = latest_checkpoint(out)
    summary = {"status": status, "warmup_steps": state.get("sft_steps"), "warmup_accuracy": state.get("sft_accuracy"),
               "accuracy_before": state.get("accuracy_before"), "eval_before": state.get("eval_before", {}),
               "seconds": seconds,
               "checkpoint": None if latest is None else str(latest), "metrics": str(out / "metrics.jsonl"), **fields}
    try:
        return write_summary(out, summary)
    except OSError as exc:
        print0(f"could not write {out / 'summary.json'}: {exc}")
        return None


def print_outputs(out: Path, plot: str | None, summary: Path | None) -> None:
    """Where a stopped run's metrics, plot and summary are."""
    print0(f"metrics : {out / 'metrics.jsonl'}" + (f"\nplot    : {plot}" if plot else "")
           + (f"\nsummary : {summary}" if summary else ""))


def write_plot(out: Path, rank: int) -> str | None:
    """The training plot; dsrl's switch is the logged `switch_step` (the one actually used). A plot that cannot be
    written (a full disk, no step logged yet) is printed as such, not raised."""
    if rank != 0 or not (out / "metrics.jsonl").is_file():
        return None
    try:
        return plot_metrics(out / "metrics.jsonl", out / "training.png")
    except (OSError, ValueError) as exc:
        print0(f"could not write the plot {out / 'training.png'}: {exc}")
        return None


def end_failed_run(out: Path, rank: int, logs: list[Any], state: dict[str, Any], seconds: float,
                   error: OSError, after: dict[str, Any]) -> None:
    """After an OSError (a full disk): close the open `logs` (progress bar first, so the error prints on a line of
    its own), then write the plot and summary.json if the disk still takes them."""
    for log in logs:
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()
    plot = write_plot(out, rank)
    summary = write_run_summary(out, rank, "failed", state, seconds, error=str(error), plot=plot, **after)
    print_outputs(out, plot, summary)
