"""The state of a training run while it runs: its inputs, the live components, the trainer state a checkpoint
keeps, and what a stop would save."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsrl_fast.data.problems import Problem, PromptSampler
from dsrl_fast.eval.periodic import EvalTask
from dsrl_fast.interrupt import MicroBatchStops
from dsrl_fast.reward import RewardFn
from dsrl_fast.rl.guard import MarginalGuard
from dsrl_fast.rollout.base import RolloutEngine
from dsrl_fast.train.batch_update import CriticSetup
from dsrl_fast.train.checkpoint import save_checkpoint
from dsrl_fast.train.components import Dist
from dsrl_fast.train.config import TrainConfig
from dsrl_fast.train.metrics_log import MetricsLogger, SampleLog, StepProgress
from dsrl_fast.train.resume_check import ResumePlan
from dsrl_fast.train.run_dir import RunLock
from dsrl_fast.train.updaters import Updater


@dataclass
class Run:
    """One training run. The first block is known before RL starts (set up by `open_run`), the components exist
    once `start_rl` has built them.

    state: the trainer state a checkpoint keeps (switch_step, accuracy/eval before RL, guard, running totals).
    stop_point: what a stop saves: None before RL (nothing), else (finished steps, the sampler state to checkpoint
    or None for the current one, whether the evaluation after those steps is still to run).
    """

    cfg: TrainConfig
    d: Dist
    out: Path
    started: float
    lock: RunLock | None
    resume_from: Path | None
    resume_plan: ResumePlan | None
    tokenizer: Any
    problems: list[Problem]
    prompts: list[list[int]]
    eval_tasks: list[EvalTask]
    marginal_prefix: tuple[int, ...]
    model: torch.nn.Module
    reward_fn: RewardFn
    engine: RolloutEngine | None = None
    updater: Updater | None = None
    critic: CriticSetup | None = None
    ref_model: torch.nn.Module | None = None
    sampler: PromptSampler | None = None
    guard: MarginalGuard | None = None
    micro_batch_stops: MicroBatchStops | None = None
    logger: MetricsLogger | None = None
    sample_log: SampleLog | None = None
    progress: StepProgress | None = None
    start_step: int = 0
    last_checkpoint: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)
    stop_point: tuple[int, dict[str, Any] | None, bool] | None = None

    def checkpoint(self, done: int) -> Path:
        """Save the checkpoint of `done` finished steps (weights, optimizer, trainer and sampler state)."""
        assert self.updater is not None and self.sampler is not None
        self.last_checkpoint = save_checkpoint(
            self.out, done, self.updater, self.tokenizer, dict(self.state, sampler=self.sampler.state_dict()),
            self.cfg.keep_checkpoints, reference=self.ref_model,
            critic=None if self.critic is None else self.critic.updater)
        return self.last_checkpoint
