"""PPO's critic: a value head on a causal LM's trunk, its clipped value loss, and the optimizer that trains it.

The critic scores the conditional space only (`[x; y]` sequences): its value of response token t is V(x, y_<t), read
from the trunk's final hidden state at the position that predicts y_t, which is exactly the position the policy's
fused loss scores. Values and the loss are computed in fp32 whatever the trunk's dtype.

The critic has its own updater (a plain AdamW with fp32 masters, or its own DeepSpeed ZeRO engine), built from the
same classes as the policy's: its module's forward takes `(batch, returns, config, old_values=...)` and returns an
object with a `.loss`, which is all an updater needs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsrl_fast.model.packed import packed_hidden_states
from dsrl_fast.data.packing import PackedBatch

__all__ = ["CriticModule", "ValueHeadModel", "ValueLossConfig", "ValueLossOutput", "build_critic_model",
           "load_critic", "save_critic", "value_loss"]


@dataclass(frozen=True)
class ValueLossConfig:
    """Options of the critic's loss on one micro-batch.

    Attributes:
        clip: PPO value clipping: the new value is kept within `clip` of the old value in the second term of
            max((V - R)², (V_clipped - R)²); None disables it.
        norm_tokens: the loss is the sum over tokens divided by this count (the mini-batch's global token count).
        loss_scale: the loss is multiplied by it (0 for a filler micro-batch).
    """

    clip: float | None = 0.5
    norm_tokens: int = 1
    loss_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.clip is not None and (isinstance(self.clip, bool) or not self.clip > 0):
            raise ValueError(f"clip must be a number > 0 or None, got {self.clip!r}")
        if isinstance(self.norm_tokens, bool) or not isinstance(self.norm_tokens, int) or self.norm_tokens < 1:
            raise ValueError(f"norm_tokens must be an int >= 1, got {self.norm_tokens!r}")


class ValueLossOutput(NamedTuple):
    """loss: () fp32. values: (M,) fp32 (with gradient). metrics: () fp32 tensors "value_clip_frac" (share of
    tokens whose clipped term was larger) and "tokens"."""

    loss: torch.Tensor
    values: torch.Tensor
    metrics: dict[str, torch.Tensor]


def value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor | None,
               config: ValueLossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 · Σ_t max((V_t - R_t)², (clip(V_t, V_old ± c) - R_t)²) / norm_tokens · loss_scale (verl's clipped loss).

    values: (M,) fp32 with gradient. returns, old_values: (M,) fp32 (old_values None: no clipping).
    """
    for name, t in (("values", values), ("returns", returns), ("old_values", old_values)):
        if t is not None and (t.dim() != 1 or t.shape != values.shape or not t.is_floating_point()):
            raise ValueError(f"{name} must be a 1-D float tensor of shape {tuple(values.shape)}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    err = (values - returns).square()
    clipped_frac = values.new_zeros(())
    if config.clip is not None and old_values is not None:
        clipped = old_values + (values - old_values).clamp(-config.clip, config.clip)
        err_clipped = (clipped - returns).square()
        with torch.no_grad():
            clipped_frac = (err_clipped > err).float().sum()
        err = torch.maximum(err, err_clipped)
    loss = 0.5 * err.sum() / config.norm_tokens * config.loss_scale
    return loss, {"value_clip_frac": clipped_frac, "tokens": values.new_tensor(float(values.shape[0]))}


class ValueHeadModel(torch.nn.Module):
    """A causal LM's trunk (prepared for packed batches) and a scalar value head: (M,) fp32 values per scored token.

    The LM head of `lm` is not used; when it is not tied to the input embedding it is frozen so that optimizers and
    ZeRO never wait for its (absent) gradient.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        dtype = next(lm.parameters()).dtype
        self.value_head = torch.nn.Linear(hidden, 1, dtype=dtype, device=next(lm.parameters()).device)
        # Zero head: the first values are 0, so the first advantages are the plain (discounted) returns.
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not lm.get_input_embeddings().weight:
            head.weight.requires_grad_(False)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """(M,) fp32 values at the loss-masked positions of `batch` (conditional sequences)."""
        hidden = packed_hidden_states(self.lm, batch)
        head = self.value_head
        return F.linear(hidden.float(), head.weight.float(), head.bias.float()).squeeze(-1)


class CriticModule(torch.nn.Module):
    """The updater-facing critic: forward(batch, returns, config, old_values) is the value loss of a micro-batch."""

    def __init__(self, model: ValueHeadModel):
        super().__init__()
        self.model = model

    def register_head_for_zero3(self) -> None:
        """Nothing to declare: the value head is used inside this module's forward (DeepSpeedUpdater calls it)."""

    def forward(self, batch: PackedBatch, returns: torch.Tensor, config: ValueLossConfig,
                old_values: torch.Tensor | None = None) -> ValueLossOutput:
        """returns, old_values: (M,) fp32, one per loss-masked token of `batch` in packed order."""
        values = self.model(batch)
        loss, metrics = value_loss(values, returns, old_values, config)
        return ValueLossOutput(loss, values, metrics)


def build_critic_model(policy: torch.nn.Module, path: str | None = None, *, trust_remote_code: bool = False,
                       attention_backend: str = "auto") -> ValueHeadModel:
    """The critic: a deep copy of `policy` (already prepared for packed batches), or the causal LM at `path` in the
    policy's dtype and device (then prepared here), under a zero-initialized value head."""
    from dsrl_fast.model.packed import prepare_packed_model

    param = next(policy.parameters())
    if path is None:
        lm = copy.deepcopy(policy)
    else:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(path, dtype=param.dtype, trust_remote_code=trust_remote_code)
        lm = prepare_packed_model(lm.to(param.device), attention_backend=attention_backend)
    for p in lm.parameters():
        p.requires_grad_(True)
    return ValueHeadModel(lm.train())


def filler_config(config: ValueLossConfig) -> ValueLossConfig:
    """The config of a zero-weight filler micro-batch (ranks with fewer micro-batches run copies)."""
    return dataclasses.replace(config, loss_scale=0.0)


CRITIC_STATE = "critic.pt"
CRITIC_DEEPSPEED = "critic_deepspeed"


def save_critic(directory: str | os.PathLike[str], updater: Any) -> None:
    """Save the critic's weights and optimizer state into a checkpoint directory (every rank must call).

    A plain updater is written by rank 0 to ``critic.pt``; a DeepSpeed one as its engine checkpoint in
    ``critic_deepspeed/``."""
    from dsrl_fast.train.updaters import DeepSpeedUpdater

    target = Path(directory)
    if isinstance(updater, DeepSpeedUpdater):
        updater.save_checkpoint(str(target / CRITIC_DEEPSPEED), tag="state")
    elif not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
        torch.save(updater.state_dict(), target / CRITIC_STATE)


def load_critic(directory: str | os.PathLike[str], updater: Any) -> None:
    """Restore what :func:`save_critic` wrote; FileNotFoundError when the checkpoint has no critic."""
    from dsrl_fast.train.updaters import DeepSpeedUpdater

    source = Path(directory)
    path = source / (CRITIC_DEEPSPEED if isinstance(updater, DeepSpeedUpdater) else CRITIC_STATE)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist: the checkpoint in {str(source)!r} holds no critic "
                                "(saved by a run without PPO)")
    if isinstance(updater, DeepSpeedUpdater):
        updater.load_checkpoint(str(path), tag="state")
    else:
        updater.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
