"""The optimizer, DeepSpeed, critic and supervised warm-up sections of a run's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsrl_fast.typed_config import Section, check_choice, check_max, check_min, check_not_empty

SCHEDULES = ("constant", "warmup", "cosine")
ZERO_STAGES = (0, 1, 2, 3)
OLD_LOGPROBS = ("recompute", "sampler")

@dataclass
class OptimConfig(Section):
    """AdamW, the learning-rate schedule and micro-batching.

    Attributes:
        lr: peak learning rate.
        marginal_lr: learning rate of marginal (PreRL) steps; null uses lr.
        weight_decay: AdamW decoupled weight decay (0.01: verl's actor default, which the authors kept).
        betas: AdamW (β1, β2), each in [0, 1).
        eps: AdamW ε.
        grad_clip: gradient-norm clipping threshold.
        schedule: "constant", "warmup" (linear warm-up, then constant) or "cosine" (warm-up, then cosine decay
            to min_lr_ratio · lr).
        warmup_steps: linear warm-up length in steps.
        min_lr_ratio: final learning rate of the cosine schedule, as a fraction of lr.
        max_tokens_per_micro_batch: token budget of one packed micro-batch; must hold the longest
            prompt + response.
        mini_batches: optimizer steps per pass over a rollout batch, each on whole prompt groups (at most
            prompts_per_step / world size). 1 with epochs 1 is on-policy (the paper).
        epochs: passes over each rollout batch (PPO epochs; not the data epochs of the top-level `epochs`).
        old_logprobs: behaviour log-probs of the clipped ratio when a batch makes more than one update:
            "recompute" (one no-grad pass of the policy before the first update, through the fused log-prob
            kernel) or "sampler" (the rollout engine's own log-probs, also with one update; marginal steps always
            recompute).
    """

    SECTION: ClassVar[str] = "optim"

    lr: float = 1e-6
    marginal_lr: float | None = None
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_tokens_per_micro_batch: int = 16384
    mini_batches: int = 1
    epochs: int = 1
    old_logprobs: str = "recompute"

    def _check(self) -> None:
        self._min("lr", 0.0, strict=True)
        self._min("marginal_lr", 0.0, strict=True)
        self._min("weight_decay", 0.0)
        for i, beta in enumerate(self.betas):
            check_min(f"{self.key('betas')}[{i}]", beta, 0.0)
            check_max(f"{self.key('betas')}[{i}]", beta, 1.0, strict=True)
        self._min("eps", 0.0, strict=True)
        self._min("grad_clip", 0.0, strict=True)
        check_choice(self.key("schedule"), self.schedule, SCHEDULES)
        self._min("warmup_steps", 0)
        self._min("min_lr_ratio", 0.0)
        check_max(self.key("min_lr_ratio"), self.min_lr_ratio, 1.0)
        self._min("max_tokens_per_micro_batch", 1)
        self._min("mini_batches", 1)
        self._min("epochs", 1)
        check_choice(self.key("old_logprobs"), self.old_logprobs, OLD_LOGPROBS)


@dataclass
class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO.

    Attributes:
        enabled: null turns DeepSpeed on when launched distributed (WORLD_SIZE > 1); a single process (one GPU)
            then uses the plain PyTorch updater, which keeps fp32 master weights and optimizer states for a 16-bit
            model just as DeepSpeed does, without its engine. true forces DeepSpeed in one process too (e.g. for
            CPU offload). Precision follows model.dtype in both: a bf16/fp16 model computes in 16 bits and is
            updated through fp32 masters.
        zero_stage: ZeRO stage 0, 1, 2 or 3.
        offload_optimizer: keep optimizer states on the CPU (ZeRO stage >= 1).
        offload_params: keep parameters on the CPU (ZeRO stage 3 only).
    """

    SECTION: ClassVar[str] = "deepspeed"

    enabled: bool | None = None
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False

    def _check(self) -> None:
        check_choice(self.key("zero_stage"), self.zero_stage, ZERO_STAGES)
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"{self.key('offload_params')}=true needs deepspeed.zero_stage 3, "
                             f"got zero_stage {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(f"{self.key('offload_optimizer')}=true needs deepspeed.zero_stage >= 1, got 0")
        if self.enabled is False and (self.offload_optimizer or self.offload_params):
            raise ValueError(f"deepspeed offloading needs {self.key('enabled')} true or null, got false")


@dataclass
class CriticConfig(Section):
    """PPO's critic (algo ppo, or dsrl with after_switch ppo): a value head on a copy of a causal LM's trunk, with its
    own AdamW (betas, eps, weight decay and gradient clipping of the optim section) and, under DeepSpeed, its own
    ZeRO engine.

    Attributes:
        model_path: the critic's causal LM (Hugging Face id or directory); null copies the policy at the start.
        lr: the critic's learning rate (constant).
        warmup_steps: first steps during which only the critic trains (the policy does not move).
        value_clip: PPO value clipping range around the old values; null disables it.
    """

    SECTION: ClassVar[str] = "critic"

    model_path: str | None = None
    lr: float = 1e-5
    warmup_steps: int = 0
    value_clip: float | None = 0.5

    def _check(self) -> None:
        check_not_empty(self.key("model_path"), self.model_path)
        self._min("lr", 0.0, strict=True)
        self._min("warmup_steps", 0)
        self._min("value_clip", 0.0, strict=True)


@dataclass
class SFTConfig(Section):
    """Supervised warm-up before RL (the toy demo uses it to reach a non-trivial starting accuracy).

    Attributes:
        steps: supervised steps on reference answers (0 skips the warm-up); with target_accuracy, the most it takes.
        batch_size: problems per supervised step.
        lr: AdamW learning rate of the warm-up.
        target_accuracy: end the warm-up at the first check whose accuracy reaches this (in (0, 1]); null runs
            exactly `steps` steps. The check samples one response per problem for the last eval_size training
            problems, which the warm-up then does not train on (RL still does), decoded like the held-out
            evaluation (rollout.temperature, or greedy with eval_greedy) with a fixed seed; it leaves the run's
            random streams alone. The accuracy reached can exceed the target by what eval_every steps add.
        eval_every: print a progress line (loss; with target_accuracy, the check's accuracy) every this many
            steps and after the last; with target_accuracy, check this often.
        eval_size: training problems held out of the warm-up for its check (target_accuracy only).
    """

    SECTION: ClassVar[str] = "sft"

    steps: int = 0
    batch_size: int = 128
    lr: float = 3e-3
    target_accuracy: float | None = None
    eval_every: int = 25
    eval_size: int = 200

    def _check(self) -> None:
        self._min("steps", 0)
        self._min("batch_size", 1)
        self._min("lr", 0.0, strict=True)
        self._min("target_accuracy", 0.0, strict=True)
        check_max(self.key("target_accuracy"), self.target_accuracy, 1.0)
        self._min("eval_every", 1)
        self._min("eval_size", 1)
        if self.target_accuracy is not None and self.steps == 0:
            raise ValueError(f"{self.key('steps')} must be >= 1 (the cap) with {self.key('target_accuracy')} set, "
                             f"got 0")
