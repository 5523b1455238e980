"""Checkpoints: optimizer/model state (plain or DeepSpeed), a Hugging Face export and the trainer's own state.

Layout: `<output_dir>/checkpoints/step_<k>/` holds `trainer_state.json` (written last: a checkpoint without it is
incomplete and ignored), `state.pt` (plain updater) or `deepspeed/` (DeepSpeed engine), `reference.pt` (the frozen
KL reference policy, when there is one) and `hf/` (model + tokenizer loadable by transformers and vLLM). `k` is the
number of finished steps, so resuming runs step k next.

A write that fails (full disk, unwritable directory) removes the partial checkpoint and raises
:class:`~dsrl_fast.errors.CheckpointWriteError` naming the directory, the cause and the free space; rotation keeps
the newest `keep` complete checkpoints and never removes the one just written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from dsrl_fast.errors import CheckpointWriteError
from dsrl_fast.model.saving import save_hf_model
from dsrl_fast.train.critic import save_critic
from dsrl_fast.train.updaters import DeepSpeedUpdater, Updater

STATE_FILE = "trainer_state.json"
REFERENCE_FILE = "reference.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The directory of the checkpoint taken after `step` finished steps."""
    return Path(output_dir) / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the most finished steps, or None."""
    root = Path(output_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def export_hf(updater: Updater, tokenizer: Any, directory: Path) -> None:
    """Write the current weights as a Hugging Face model directory (rank 0 writes; every rank must call)."""
    model = updater.module.model
    if isinstance(updater, DeepSpeedUpdater) and updater.zero_stage == 3:
        state = updater.engine._zero3_consolidated_16bit_state_dict()
        prefix = "model."
        state = {k.removeprefix(prefix): v for k, v in (state or {}).items()}
    else:
        state = None
    if _rank() == 0:
        save_hf_model(model, tokenizer, directory, state_dict=state)


def save_checkpoint(output_dir: str | Path, step: int, updater: Updater, tokenizer: Any, trainer_state: dict[str, Any],
                    keep: int, reference: torch.nn.Module | None = None, critic: Updater | None = None) -> Path:
    """Save everything needed to resume after `step` finished steps; keep the newest `keep` checkpoints.

    reference: the frozen KL reference policy, saved too (it is neither the initial nor the current actor after a
    dsrl re-sync, so a resumed run cannot rebuild it). critic: PPO's value-model updater, saved too
    (dsrl_fast.train.critic.save_critic). Both are written before the trainer state that marks the checkpoint
    complete.
    """
    target = checkpoint_dir(output_dir, step)
    if _rank() == 0 and target.exists():
        shutil.rmtree(target)
    _barrier()
    try:
        _write_checkpoint(target, step, updater, tokenizer, trainer_state, reference, critic)
    except (OSError, RuntimeError, SafetensorError) as exc:
        # torch.save reports a full disk as RuntimeError ("unexpected pos ..."), safetensors (the Hugging Face export)
        # as its own SafetensorError: say what really happened.
        shutil.rmtree(target, ignore_errors=True)
        free = shutil.disk_usage(target.parent).free if target.parent.exists() else 0
        raise CheckpointWriteError(f"could not write checkpoint {str(target)!r}: {exc}; {free / 2**20:,.0f} MiB free "
                                   "on its disk (partial checkpoint removed)") from exc
    if _rank() == 0:
        others = sorted(p for p in target.parent.glob("step_*") if (p / STATE_FILE).is_file() and p != target)
        for old in others[:max(0, len(others) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return target


def _write_checkpoint(target: Path, step: int, updater: Updater, tokenizer: Any, trainer_state: dict[str, Any],
                      reference: torch.nn.Module | None, critic: Updater | None) -> None:
    if isinstance(updater, DeepSpeedUpdater):
        updater.save_checkpoint(str(target / "deepspeed"), tag="state")
    elif _rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
        torch.save(updater.state_dict(), target / "state.pt")
    if reference is not None and _rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
        torch.save(reference.state_dict(), target / REFERENCE_FILE)
    if critic is not None:
        save_critic(target, critic)
    export_hf(updater, tokenizer, target / "hf")
    _barrier()
    if _rank() == 0:
        state = dict(trainer_state, step=step, torch_rng=torch.get_rng_state().tolist())
        (target / (STATE_FILE + ".tmp")).write_text(json.dumps(state))
        (target / (STATE_FILE + ".tmp")).rename(target / STATE_FILE)


def load_checkpoint(directory: Path, updater: Updater) -> dict[str, Any]:
    """Restore the updater from `directory` and return the trainer state saved with it."""
    state = json.loads((directory / STATE_FILE).read_text())
    if isinstance(updater, DeepSpeedUpdater):
        updater.load_checkpoint(str(directory / "deepspeed"), tag="state")
    else:
        updater.load_state_dict(torch.load(directory / "state.pt", map_location="cpu", weights_only=True))
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state


def load_reference(directory: Path, reference: torch.nn.Module) -> None:
    """Restore the KL reference policy saved with the checkpoint in `directory` into `reference`."""
    path = directory / REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: the checkpoint was saved without a KL reference "
                                "(algo.kl_coef was 0); resume with algo.kl_coef=0 or start a new run")
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
