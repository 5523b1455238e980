"""What a resume may change: the resumed config against the one the run was saved with, and its history.

A run's settings fall in three kinds (each key of :class:`~dsrl_fast.train.config.TrainConfig` is in one):

- :data:`SAFE_KEYS` set how long the run is and how it is logged, evaluated, checkpointed, shown or placed on the
  hardware; a resume may change them, and the changes are printed and recorded. ``epochs`` is safe from one number
  to another (only the run's length changes); from or to null it changes the data order (drop_last).
- :data:`FIXED_KEYS` are what the checkpoint itself is made of (the data order, the optimizer state's layout); no
  resume can change them.
- Every other key defines what the run computes (model, data, sampling, algorithm, optimizer, precision, critic,
  guard, warm-up, reward, what the held-out accuracy means); a change is refused unless ``resume_changes=allow``.

``config.yaml`` is the run's original config and is never rewritten by a resume; each resume writes
``config.resume-<n>.yaml`` (n = 1, 2, ...) holding the config it continued with, under a comment naming its checkpoint
and its changes. A resume compares with the newest file of that history.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dsrl_fast.errors import UserError
from dsrl_fast.train.config import TrainConfig, config_to_dict, load_config
from dsrl_fast.train.metrics_log import print0

__all__ = ["FIXED_KEYS", "IGNORED_KEYS", "SAFE_KEYS", "Change", "ResumePlan", "check_resume", "config_history",
           "flat_config", "record_resume"]

CONFIG_FILE = "config.yaml"
_RESUME_FILE = re.compile(r"config\.resume-(\d+)\.yaml")

SAFE_KEYS = frozenset({
    "steps", "log_every", "eval_every", "eval_benchmarks", "checkpoint_every", "keep_checkpoints", "log_samples",
    "tensorboard", "wandb_project", "progress",
    "model.attention_backend", "model.gradient_checkpointing", "model.use_liger", "model.trust_remote_code",
    "rollout.gpu_memory_utilization", "rollout.vllm_kv_cache_gib", "rollout.tensor_parallel_size",
    "rollout.sleep_between_generations", "optim.max_tokens_per_micro_batch", "deepspeed.offload_optimizer",
    "deepspeed.offload_params",
})
# key -> why a checkpoint cannot continue under another value
FIXED_KEYS = {
    "seed": "the checkpoint's data order and the toy problems are drawn from it",
    "deepspeed.enabled": "the checkpoint's optimizer state is stored by the updater it selects",
    "deepspeed.zero_stage": "the checkpoint's optimizer state is partitioned for it",
}
# The directory itself and the switches that say how to start; never compared.
IGNORED_KEYS = frozenset({"output_dir", "resume", "overwrite", "resume_changes"})


@dataclass(frozen=True)
class Change:
    """One setting whose value differs from the saved config."""

    key: str
    saved: Any
    now: Any

    def __str__(self) -> str:
        return f"{self.key} {_show(self.saved)} -> {_show(self.now)}"


@dataclass(frozen=True)
class ResumePlan:
    """A resume the check accepted: the config it was compared with (None: none was found), where its config goes
    and what it changes."""

    compared_with: Path | None
    record: Path
    checkpoint: Path
    changes: tuple[Change, ...]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as dotted key -> plain value (``optim.lr``: 0.0001; tuples as lists)."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(config_to_dict(cfg), "")
    return flat


def _effective(flat: dict[str, Any], world_size: int) -> dict[str, Any]:
    """`flat` with deepspeed.enabled resolved for `world_size` (null: DeepSpeed when distributed) and zero_stage
    dropped when DeepSpeed is off (it then selects nothing)."""
    out = dict(flat)
    enabled = out["deepspeed.enabled"]
    out["deepspeed.enabled"] = world_size > 1 if enabled is None else enabled
    if not out["deepspeed.enabled"]:
        out.pop("deepspeed.zero_stage")
    return out


def config_history(output_dir: str | os.PathLike[str]) -> list[Path]:
    """``config.yaml`` (when present) followed by ``config.resume-<n>.yaml`` in resume order."""
    out = Path(output_dir)
    resumes = [(int(m.group(1)), p) for p in out.glob("config.resume-*.yaml")
               if (m := _RESUME_FILE.fullmatch(p.name))]
    original = [out / CONFIG_FILE] if (out / CONFIG_FILE).is_file() else []
    return original + [p for _, p in sorted(resumes)]


def check_resume(cfg: TrainConfig, checkpoint: Path, world_size: int) -> ResumePlan:
    """Compare `cfg` (resolved) with the newest config of the run in cfg.output_dir before resuming from `checkpoint`.

    Raises UserError (one line listing every change) when a FIXED_KEYS setting changes, or another setting outside
    SAFE_KEYS changes while cfg.resume_changes is "refuse". Writes nothing; record_resume() does, once the
    checkpoint has loaded.
    """
    out = Path(cfg.output_dir)
    history = config_history(out)
    resumes = len(history) - 1 if history and history[0].name == CONFIG_FILE else len(history)
    record = out / f"config.resume-{resumes + 1}.yaml"
    if not history:
        print0(f"resume: {str(out / CONFIG_FILE)!r} is missing, so the resumed settings cannot be compared with the "
               "run's; they are recorded in " + record.name)
        return ResumePlan(None, record, checkpoint, ())
    saved_path = history[-1]
    try:
        saved = load_config(saved_path)
    except (ValueError, TypeError) as exc:
        raise UserError(f"resume=true compares with the run's saved config {str(saved_path)!r}, which cannot be read "
                        f"({exc}): fix or remove that file") from exc
    before, now = _effective(flat_config(saved), world_size), _effective(flat_config(cfg), world_size)
    changes = [Change(key, before.get(key), now.get(key)) for key in now.keys() & before.keys()
               if key not in IGNORED_KEYS and before.get(key) != now.get(key)]
    changes.sort(key=lambda c: c.key)
    fixed = [c for c in changes if c.key in FIXED_KEYS]
    if fixed:
        why = "; ".join(f"{c.key}: {FIXED_KEYS[c.key]}" for c in fixed)
        keep = " ".join(f"{c.key}={_show(c.saved)}" for c in fixed)
        raise UserError(f"resume=true cannot change {', '.join(map(str, fixed))} (saved in {str(saved_path)!r}; "
                        f"{why}): resume with {keep}, or start a new run in another output_dir")
    defining = [c for c in changes if not _is_safe(c)]
    if defining and cfg.resume_changes == "refuse":
        raise UserError(f"resume=true would change what the run is: {', '.join(map(str, defining))} (saved in "
                        f"{str(saved_path)!r}): pass resume_changes=allow to continue with the new values, resume "
                        "with the saved ones, or start a new run in another output_dir")
    return ResumePlan(saved_path, record, checkpoint, tuple(changes))


def _is_safe(change: Change) -> bool:
    if change.key == "epochs":
        return change.saved is not None and change.now is not None
    return change.key in SAFE_KEYS


def record_resume(cfg: TrainConfig, plan: ResumePlan) -> None:
    """Write the resumed config to plan.record (never over config.yaml) and print what the resume changes."""
    changed = ", ".join(map(str, plan.changes)) or "nothing"
    of = "a run without config.yaml" if plan.compared_with is None else plan.compared_with.name
    header = f"# resume of {of} from {plan.checkpoint.parent.name}/{plan.checkpoint.name}; changed: {changed}\n"
    plan.record.write_text(header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    if plan.changes:
        allowed = [c for c in plan.changes if not _is_safe(c)]
        note = f" ({len(allowed)} allowed by resume_changes=allow)" if allowed else ""
        print0(f"resume changes {changed}{note}; recorded in {plan.record}")
