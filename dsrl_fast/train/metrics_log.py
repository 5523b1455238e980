"""Run metrics: a JSONL file (always), TensorBoard and wandb (optional), rank-0 printing and a step progress bar.

``<output_dir>/metrics.jsonl`` holds one JSON object per logged step. Keys the trainer writes (the logger itself
accepts any str -> int/float/str mapping):

- ``step``: 0-based RL step index.
- ``space``: ``"marginal"`` (PreRL, the response scored without its prompt) or ``"conditional"`` (standard RL).
- ``samples``: which samples updated the policy: ``"negative"``, ``"positive"`` or ``"all"``.
- ``reward_mean``: mean reward of the step's rollouts. ``accuracy``: fraction of rollouts answered correctly.
- ``response_len_mean``: mean response length in tokens.
- ``loss``: the aggregated policy loss. ``clip_frac``: fraction of kept tokens whose ratio was clipped.
- ``entropy``: mean token entropy. ``grad_norm``: gradient norm before clipping.
- ``tokens_per_s``: (prompt + response) tokens processed per second of the step.
- ``logprob_drift``: mean |trainer log-prob - sampler log-prob| over response tokens.
- ``fully_solved`` / ``fully_unsolved``: fraction of prompts whose rollouts were all right / all wrong.
- ``fully_solved_total`` / ``fully_unsolved_total``: running counts of such prompt groups since step 0 (the paper's
  Fig. 6; a question drawn again in a later epoch counts again).
- ``transition_share`` / ``reflection_share`` / ``execution_share``: share of the step's reasoning steps (responses
  split on blank lines) in each class of the paper's thought taxonomy (:mod:`dsrl_fast.eval.thoughts`).
- ``lr``: learning rate of the step.
- ``eval_accuracy`` and ``eval/<set>/avg@n``, ``eval/<set>/pass@k``: a periodic evaluation (``eval_every``), in a
  separate record of the step after which it was measured.
- ``eval_accuracy_before`` and ``eval_before/<set>/<metric>``: the evaluation before RL, in a separate record of
  step 0 written before step 0's own; ``eval_accuracy_after`` and ``eval_after/<set>/<metric>``: the evaluation after
  RL, in a separate record of the last step.
- ``update_skipped``: why a step made no update (e.g. "every reward is 0"), present only on such steps.

Every line is strict JSON: a non-finite float (a diverged loss) is written as ``null``, never as a bare ``NaN``.

``<output_dir>/samples.jsonl`` (:class:`SampleLog`) holds a few completions per step: ``step``, ``prompt``,
``response``, ``reward``. ``<output_dir>/summary.json`` (:func:`write_summary`) holds the run's outcome: see
:func:`dsrl_fast.train.trainer.train`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import uuid
from pathlib import Path
from typing import Any, Self

import torch

__all__ = ["METRICS_FILE", "SAMPLES_FILE", "SUMMARY_FILE", "MetricsLogger", "SampleLog", "StepProgress", "is_rank0",
           "print0", "read_metrics", "write_summary"]

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
_WANDB_ID_FILE = "wandb_run_id"


def is_rank0() -> bool:
    """True on the process that logs: rank 0 of torch.distributed, or of the launcher's RANK before init."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, flushed."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in file order; lines that are not a JSON object (a write cut by a
    kill) are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None, recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(output_dir: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write `summary` (JSON-able; non-finite floats become null) to ``<output_dir>/summary.json`` atomically (a
    temporary file, then a rename: a failed write leaves the previous summary) and return its path."""
    if not isinstance(summary, dict):
        raise TypeError(f"summary must be a dict, got {type(summary).__name__}")
    path = Path(output_dir) / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _plain_value(key: str, value: Any) -> int | float | str | None:
    """`value` as a JSON scalar; a non-finite float becomes None (JSON null)."""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    raise TypeError(f"metrics[{key!r}] must be an int, float or str (call .item() on tensors), "
                    f"got {type(value).__name__}")


class MetricsLogger:
    """Appends one JSON line per step to ``<output_dir>/metrics.jsonl``; optionally mirrors to TensorBoard / wandb.

    Only rank 0 writes; on other ranks every method is a no-op. Without `resume` an existing metrics file is
    replaced; with it, lines are appended (call truncate_after(resume_step) to drop the steps that will be redone).
    Each line is flushed as it is written, so a killed run loses nothing already logged.

    Args:
        output_dir: run directory (created if missing).
        tensorboard: also write TensorBoard scalars under ``<output_dir>/tensorboard`` (needs tensorboard).
        wandb_project: also log to this wandb project (needs wandb); the run id is kept in output_dir so a
            resumed run continues the same wandb run.
        config_dict: the resolved config, stored as TensorBoard text and wandb config.
        resume: keep and append to an existing metrics file.
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, tensorboard: bool = False,
                 wandb_project: str | None = None, config_dict: dict[str, Any] | None = None,
                 resume: bool = False):
        if wandb_project is not None and (not isinstance(wandb_project, str) or not wandb_project):
            raise ValueError(f"wandb_project must be a non-empty str or None, got {wandb_project!r}")
        if config_dict is not None and not isinstance(config_dict, dict):
            raise TypeError(f"config_dict must be a dict or None, got {type(config_dict).__name__}")
        self.enabled = is_rank0()
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self._config_dict = config_dict
        self._file = None
        self._tb = None
        self._wandb_run = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._tb = self._summary_writer(purge_step=None)
        if wandb_project is not None:
            self._wandb_run = self._init_wandb(wandb_project, resume)
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 (held across log calls)

    def _summary_writer(self, purge_step: int | None) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from exc
        writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge_step)
        if self._config_dict is not None and purge_step is None:
            writer.add_text("config", "```\n" + json.dumps(self._config_dict, indent=2) + "\n```")
        return writer

    def _init_wandb(self, project: str, resume: bool) -> Any:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(f"wandb_project={project!r} needs the wandb package: pip install wandb") from exc
        id_file = self.output_dir / _WANDB_ID_FILE
        if resume and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            id_file.write_text(run_id, encoding="utf-8")
        return wandb.init(project=project, id=run_id, resume="allow", dir=str(self.output_dir),
                          config=self._config_dict)

    def log(self, step: int, metrics: dict[str, float | int | str]) -> None:
        """Record `metrics` of step `step` (a JSON line with "step" first; numbers also go to TensorBoard/wandb)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"log() after close() of the metrics logger for {str(self.path)!r}")
        record: dict[str, int | float | str | None] = {"step": step}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise TypeError(f"metrics keys must be str, got {type(key).__name__} {key!r}")
            value = _plain_value(key, value)
            if key == "step" and value != step:
                raise ValueError(f"metrics['step'] must equal step={step} when given, got {value!r}")
            record[key] = value
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(numeric, step=step)

    def truncate_after(self, step: int) -> int:
        """Drop the records with step >= `step` (the steps a resumed run redoes); returns how many were dropped.

        The file is rewritten atomically (temporary file + rename); TensorBoard events from `step` on are purged.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not self.enabled:
            return 0
        if self._file is None:
            raise RuntimeError(f"truncate_after() after close() of the metrics logger for {str(self.path)!r}")
        self._file.close()
        dropped = _truncate_jsonl(self.path, step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held across log calls)
        if self._tb is not None:
            self._tb.close()
            self._tb = self._summary_writer(purge_step=step)
        return dropped

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_jsonl(path: Path, step: int) -> int:
    """Keep the lines of `path` whose record has an int step < `step` (atomic rewrite); returns how many were
    dropped (unparsable lines included)."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(kept)


class SampleLog:
    """Appends completions to ``<output_dir>/samples.jsonl`` on rank 0 (a no-op elsewhere).

    Without `resume` an existing file is replaced; with it, the records of steps >= `resume_step` (redone by the
    resumed run) are dropped first.
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, resume_step: int | None = None):
        self.path = Path(output_dir) / SAMPLES_FILE
        self._file = None
        if not is_rank0():
            return
        if resume_step is not None and self.path.is_file():
            _truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, prompt: str, response: str, reward: float) -> None:
        """One completion of step `step` and its reward."""
        if self._file is None:
            return
        record = {"step": step, "prompt": prompt, "response": response, "reward": _plain_value("reward", reward)}
        self._file.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class StepProgress:
    """A tqdm bar over RL steps showing the step, reward and tokens/s; silent on non-zero ranks or when disabled.

    Args:
        total: number of steps of the run.
        initial: steps already done (a resumed run starts there).
        enabled: False hides the bar on every rank.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be an int >= 0, got {total!r}")
        if isinstance(initial, bool) or not isinstance(initial, int) or not 0 <= initial <= total:
            raise ValueError(f"initial must be an int in [0, total={total}], got {initial!r}")
        from tqdm.auto import tqdm

        self.enabled = bool(enabled) and is_rank0()
        self._bar = tqdm(total=total, initial=initial, disable=not self.enabled, unit="step", dynamic_ncols=True,
                         desc="train")

    @property
    def n(self) -> int:
        """Steps shown as done."""
        return int(self._bar.n)

    def update(self, step: int, reward: float, tokens_per_s: float, note: str | None = None) -> None:
        """Move the bar to `step` steps done (the 0-based index of the step just finished + 1) and show that step's
        mean reward and throughput, and `note` (e.g. why the step made no update) when given."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1 (steps done), got {step!r}")
        if not self.enabled:
            return
        postfix = {"step": step, "reward": f"{reward:.3f}", "tok_s": f"{tokens_per_s:,.0f}"}
        if note:
            postfix["note"] = note
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def end_at(self, total: int) -> None:
        """The run now ends after `total` steps (the guard stopped it early): the bar's total shrinks to it."""
        if isinstance(total, bool) or not isinstance(total, int) or not self.n <= total:
            raise ValueError(f"total must be an int >= the steps done ({self.n}), got {total!r}")
        self._bar.total = total
        self._bar.refresh()

    def write(self, message: str) -> None:
        """Print a line above the bar (rank 0 only)."""
        if is_rank0():
            self._bar.write(message)

    def close(self) -> None:
        """Remove the bar's resources (safe to call twice)."""
        self._bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
