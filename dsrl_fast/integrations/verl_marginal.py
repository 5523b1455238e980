"""verl 0.9.1: DSRL's marginal (NSR-PreRL) warm-up inside verl's v1 trainer: one registered trainer, one worker hook.

Launch (with the losses of `dsrl_fast.integrations.verl`; `verl_launch` loads the plugin in every verl process)::

    python -m dsrl_fast.integrations.verl_launch trainer.v1.trainer_mode=dsrl +dsrl.switch_step=19 \
        actor_rollout_ref.actor.policy_loss.loss_mode=dsrl algorithm.norm_adv_by_std_in_grpo=False ...

- Task runner: `DSRLPPOTrainer`, registered as "dsrl" with verl's `register_trainer` by `install()`, is verl's
  synchronous trainer. verl's TaskRunnerV1 looks the trainer up by `trainer.v1.trainer_mode`, and verl's trainer then
  branches on that same name (replay buffer, batch refill, checkpointing: anything but "sync" takes the asynchronous
  paths), so the trainer sets the mode back to "sync" before verl's constructor reads it. Its `_update_actor` adds
  the non-tensor `dsrl_marginal` ({"prefix": [...], "loss_scale": ...}) to the batch for steps 1..switch_step (verl
  counts from 1: 19 marginal updates, like the authors' `step < 20`). Options come from the config's `dsrl` block:
  switch_step (default 19), prefix (default [151644], Qwen's <|im_start|>), loss_scale (default 0.01, the authors'
  pretrain_loss_coef).
- Worker: `install_worker_hook()` wraps verl's `TrainingWorker.train_mini_batch`. When `dsrl_marginal` is present
  it rebuilds every row as ``[prefix] + response`` with position ids from 0 (`marginal_rows`; "prompts" becomes the
  prefix, so verl's own `no_padding_2_padding` slices out the response log-probs), zeroes loss_mask/response_mask of
  rows without a negative advantage (verl's engine then counts only the kept tokens in its global `batch_num_tokens`),
  and runs the update with `marginal_policy_loss`: the clipped loss on the marginal log-probs, on-policy
  (old = log-prob detached, ratio 1), NSR, times loss_scale, divided by that global kept-token count, so the
  gradient does not depend on the micro-batch split; no KL and no entropy term. From step switch_step + 1 the
  configured loss_mode runs on the normal rows.

Limits: on-policy only (one mini-batch and one epoch per step, the authors' setup; otherwise a ValueError); text-only
rows with 1-D position ids; the authors' r − mean advantage needs algorithm.norm_adv_by_std_in_grpo=False (which then
also applies after the switch); verl's conditional old-log-prob pass still runs during the warm-up (unused there),
and rows the NSR filter drops still run the marginal forward/backward (with zero loss weight); the reference policy
is not re-synced at the switch; verl's legacy trainer (trainer.use_v1=False) is not supported.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.integrations.common import check_prefix, kept_rows, peer_policy_loss, pip_extra, require
from dsrl_fast.data.packing import DEFAULT_PREFIX

_PIP = pip_extra("verl")
_tu = require("verl.utils.tensordict_utils", _PIP)
_padding = require("verl.workers.utils.padding", _PIP)
_metric = require("verl.utils.metric", _PIP)
_engine_workers = require("verl.workers.engine_workers", _PIP)
_trainer_sync = require("verl.trainer.ppo.v1.trainer_sync", _PIP)
_trainer_base = require("verl.trainer.ppo.v1.trainer_base", _PIP)

FLAG = "dsrl_marginal"
TRAINER_NAME = "dsrl"
SYNC_MODE = "sync"
DEFAULTS = {"switch_step": 19, "prefix": DEFAULT_PREFIX, "loss_scale": 0.01}

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))  # verl's own convention (its root logger stays at WARNING)

__all__ = ["DEFAULTS", "FLAG", "TRAINER_NAME", "DSRLPPOTrainer", "install", "install_worker_hook", "marginal_options",
           "marginal_policy_loss", "marginal_rows"]


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def marginal_rows(data: Any, prefix: tuple[int, ...]) -> Any:
    """Rebuild verl's v1 worker batch (a TensorDict of jagged tensors) as the marginal rows, in place.

    Reads responses, response_mask, advantages: (B, j) jagged. Writes input_ids (B, P+j) = [prefix; response],
    position_ids (B, P+j) = 0..P+j-1, prompts (B, P) = prefix, responses (B, j) jagged, and response_mask / loss_mask
    (B, j) zeroed on rows with no negative advantage (the NSR filter). Returns `data`.
    """
    check_prefix("prefix", prefix)
    for name in ("responses", "response_mask", "advantages", "position_ids"):
        if not data[name].is_nested:
            raise ValueError(f"{name} must be a jagged nested tensor (verl's v1 trainer), got a dense tensor of "
                             f"shape {tuple(data[name].shape)}")
    if data["position_ids"].dim() != 2:
        raise ValueError(f"position_ids must be (B, j) (text-only rows), got {data['position_ids'].dim()} dims")
    responses = list(data["responses"].unbind())
    masks = list(data["response_mask"].unbind())
    advantages = list(data["advantages"].unbind())
    head = torch.tensor(prefix, dtype=responses[0].dtype, device=responses[0].device)
    keep = [bool(kept_rows(a[None], m[None].bool(), "negative")[0]) for a, m in zip(advantages, masks)]
    kept_masks = _nested([m if k else torch.zeros_like(m) for m, k in zip(masks, keep)])
    data["input_ids"] = _nested([torch.cat([head, r]) for r in responses])
    data["position_ids"] = _nested([torch.arange(len(prefix) + r.numel(), device=r.device) for r in responses])
    data["prompts"] = _nested([head.clone() for _ in responses])
    data["responses"] = _nested(responses)
    data["response_mask"] = kept_masks
    data["loss_mask"] = kept_masks
    return data


def marginal_policy_loss(model_output: dict[str, torch.Tensor], data: Any, dp_group: Any = None, *,
                         config: PolicyLossConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl loss-function contract (model_output, data, dp_group) → (loss, metrics) for the marginal phase.

    model_output["log_probs"]: (B, P+j) jagged next-token log-probs of the marginal rows. The loss is
    `token_policy_loss` on-policy with `config` (samples="negative"), divided by verl's global kept-token count
    `batch_num_tokens` / dp_size (0 kept tokens anywhere gives a zero loss).
    """
    log_prob = _padding.no_padding_2_padding(model_output["log_probs"], data)
    rows, width = log_prob.shape
    mask = torch.nested.to_padded_tensor(data["response_mask"], 0, output_size=(rows, width)).bool()
    advantages = torch.nested.to_padded_tensor(data["advantages"], 0.0, output_size=(rows, width))
    count = max(float(data["batch_num_tokens"]), 1.0) / data["dp_size"]
    loss, metrics = peer_policy_loss(log_prob, advantages, mask, old_logprobs=None, config=config,
                                     denominator="peer", peer_count=count)
    return loss, {"actor/pg_loss": _metric.Metric(value=loss, aggregation=_metric.AggregationType.SUM),
                  "actor/dsrl_kept_tokens": metrics["kept_tokens"].item()}


def _check_on_policy(worker: Any, data: Any) -> None:
    epochs = _tu.get(data, "epochs", default=1)
    mini = _tu.get(data, "mini_batch_size", default=None)
    per_rank = None if mini is None else mini // worker.engine.get_data_parallel_size()
    if epochs != 1 or (per_rank is not None and per_rank < data.shape[0]) or _tu.get(
            data, "num_mini_batch", default=1) not in (None, 1):
        raise ValueError(f"the marginal phase is on-policy: it needs one epoch and one mini-batch per step "
                         f"(ppo_epochs=1, ppo_mini_batch_size=train_batch_size), got epochs={epochs}, "
                         f"mini-batch {per_rank} rows per rank for {data.shape[0]} rows")


def install_worker_hook() -> None:
    """Wrap verl's `TrainingWorker.train_mini_batch` so a batch carrying `dsrl_marginal` trains on the marginal
    rows with `marginal_policy_loss` (idempotent; other batches run verl's method unchanged)."""
    worker_cls = _engine_workers.TrainingWorker
    original = worker_cls.train_mini_batch
    if getattr(original, "_dsrl_fast", False):
        return

    @functools.wraps(original)
    def train_mini_batch(self: Any, data: Any) -> Any:
        spec = _tu.pop(data, FLAG, default=None)
        if spec is None:
            return original(self, data)
        _check_on_policy(self, data)
        marginal_rows(data, tuple(spec["prefix"]))
        config = PolicyLossConfig(samples="negative", loss_scale=float(spec["loss_scale"]))
        saved = self.loss_fn
        self.loss_fn = functools.partial(marginal_policy_loss, config=config)
        try:
            return original(self, data)
        finally:
            self.loss_fn = saved

    train_mini_batch._dsrl_fast = True  # type: ignore[attr-defined]
    worker_cls.train_mini_batch = train_mini_batch


def marginal_options(config: Any) -> dict[str, Any]:
    """The `dsrl` block of a verl config (a mapping or None) merged over DEFAULTS, validated."""
    block = dict(config.get("dsrl") or {}) if config is not None else {}
    unknown = set(block) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"dsrl options must be among {sorted(DEFAULTS)}, got unknown {sorted(unknown)}")
    options = {**DEFAULTS, **block}
    step = options["switch_step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"dsrl.switch_step must be an int >= 0, got {step!r}")
    options["prefix"] = tuple(int(t) for t in options["prefix"])
    options["loss_scale"] = float(options["loss_scale"])
    return options


class DSRLPPOTrainer(_trainer_sync.PPOTrainerSync):
    """verl's synchronous v1 trainer that marks the first `dsrl.switch_step` actor updates as marginal.

    config: verl's resolved DictConfig, selected with trainer.v1.trainer_mode=dsrl; its trainer_mode is set to
    "sync" here, before verl's constructor branches on it.
    """

    def __init__(self, config: Any) -> None:
        self.dsrl_options = marginal_options(config)
        config.trainer.v1.trainer_mode = SYNC_MODE
        super().__init__(config=config)
        opts = self.dsrl_options
        logger.info("dsrl: verl trainer %r in mode %r (%s); marginal NSR-PreRL updates for steps 1..%d (prefix %s, "
                    "loss scale %g), then loss_mode %r", TRAINER_NAME, self.trainer_mode,
                    type(self.replay_buffer).__name__, opts["switch_step"], list(opts["prefix"]), opts["loss_scale"],
                    config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla"))

    def in_marginal_phase(self) -> bool:
        """True while the warm-up runs (verl's global_steps count from 1)."""
        return self.global_steps <= self.dsrl_options["switch_step"]

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        marginal = self.in_marginal_phase()
        metrics["dsrl/marginal_phase"] = float(marginal)
        if not marginal:
            return super()._update_actor(batch, metrics)
        batch.extra_info[FLAG] = {"prefix": list(self.dsrl_options["prefix"]),
                                  "loss_scale": self.dsrl_options["loss_scale"]}
        try:
            return super()._update_actor(batch, metrics)
        finally:
            batch.extra_info.pop(FLAG, None)


def install() -> None:
    """Register `DSRLPPOTrainer` as verl trainer "dsrl" and install the worker hook (idempotent)."""
    _trainer_base.register_trainer(TRAINER_NAME)(DSRLPPOTrainer)
    install_worker_hook()
