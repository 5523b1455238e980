"""The configuration of a training run: :class:`TrainConfig`, its nine sections, presets, YAML and overrides.

A run is one :class:`TrainConfig` holding nine sections (``model``, ``data``, ``rollout``, ``algo``, ``optim``,
``deepspeed``, ``critic``, ``guard``, ``sft``), each owned by the layer that uses it (dsrl_fast/model/config.py,
dsrl_fast/data/config.py, dsrl_fast/rollout/config.py, dsrl_fast/rl/config.py, dsrl_fast/train/sections.py). Every
field is type-checked and range-checked when its dataclass is built (dsrl_fast/typed_config.py); errors name the
dotted key (``algo.switch_step``), what was expected and what was received.

Loading order of :func:`load_config`: the base (the YAML file, over the dataclass defaults; without a file,
:func:`embedded_default`), then each ``key=value`` override in turn. Values are parsed as YAML
(``algo.marginal_prefix=[151644]``, ``model.name_or_path=null``) and coerced to the field's type.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsrl_fast.data.config import DataConfig
from dsrl_fast.model.config import ModelConfig
from dsrl_fast.reward import check_reward_spec
from dsrl_fast.rl.config import AlgoConfig, GuardConfig
from dsrl_fast.rollout.config import RolloutConfig
from dsrl_fast.train.sections import CriticConfig, DeepSpeedConfig, OptimConfig, SFTConfig
from dsrl_fast.typed_config import (
    Section,
    apply_override,
    build,
    check_choice,
    check_not_empty,
    describe,
    read_yaml,
    to_plain,
)

__all__ = [
    "AlgoConfig",
    "CriticConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "GuardConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "SFTConfig",
    "TrainConfig",
    "config_help",
    "config_to_dict",
    "embedded_default",
    "list_presets",
    "load_config",
    "paper_default",
    "preset_path",
    "save_config",
]

RESUME_CHANGES = ("refuse", "allow")
_PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class TrainConfig(Section):
    """One training run.

    Attributes:
        model, data, rollout, algo, optim, deepspeed, critic, guard, sft: the sections above.
        steps: RL steps (each samples prompts_per_step × rollout.n responses and makes one update); null runs
            `epochs` passes over the training problems.
        epochs: null lets batches run across epoch ends (every batch is full, each epoch reshuffled); a number
            makes the sampler drop each epoch's last partial batch (the authors' dataloader, drop_last) and, when
            steps is null, sets the run length to epochs × ⌊problems / prompts_per_step⌋ steps (the paper: 6
            passes over MATH's 7,500 problems at 128 prompts = 348 steps).
        prompts_per_step: prompts per RL step (global, over all ranks).
        seed: seed of data order, sampling and initialization.
        output_dir: directory of the resolved config, metrics.jsonl, samples.jsonl, checkpoints and plots. A run
            refuses a directory that holds another run's checkpoints or metrics unless resume or overwrite is true.
        log_every: write metrics every this many steps.
        eval_every: evaluate every this many steps (0 = only before and after training).
        eval_greedy: evaluate with greedy decoding instead of sampling at rollout.temperature.
        eval_n: responses sampled per evaluation problem: the held-out accuracy is their mean reward (Avg@n), and
            eval/<set>/avg@n and eval/<set>/pass@k (k = 1, 2, 4, ... <= eval_n) are logged at every evaluation.
        eval_benchmarks: more sets evaluated beside the held-out one, as `dsrl-fast eval --data` specs (benchmark
            names read from $DSRL_FAST_DATA, else ./data; files; label=file; hf:...), data.eval_size problems each;
            null: none.
        checkpoint_every: save a checkpoint every this many steps (0 = only at the end).
        keep_checkpoints: number of most recent checkpoints kept on disk (the one just written always is).
        resume: continue from the latest complete checkpoint in output_dir (an empty output_dir starts fresh).
        resume_changes: what resume=true does when a setting that defines the run differs from the run's saved config
            (the model, data, sampling, algorithm, optimizer, precision, critic, guard, warm-up, prompts_per_step,
            epochs from or to null, reward, eval_n, eval_greedy): "refuse" (one line naming each change, nothing written) or "allow"
            (continue with the new values). steps, log_every, eval_every, eval_benchmarks, checkpoint_every,
            keep_checkpoints, log_samples, tensorboard, wandb_project, progress, model.attention_backend,
            model.gradient_checkpointing, model.use_liger, model.trust_remote_code, rollout.gpu_memory_utilization,
            rollout.vllm_kv_cache_gib, rollout.tensor_parallel_size, rollout.sleep_between_generations,
            optim.max_tokens_per_micro_batch, deepspeed.offload_optimizer and deepspeed.offload_params may always
            change, and epochs from one number to another; seed, deepspeed.enabled and deepspeed.zero_stage never
            can (the checkpoint is made of them).
            config.yaml keeps the original; each resume is recorded in config.resume-<n>.yaml.
        overwrite: delete a previous run's checkpoints, metrics, samples and plot in output_dir and start anew.
        log_samples: completions (prompt, response, reward) written to samples.jsonl per step (0 disables it).
        tensorboard: also log to TensorBoard (needs the tensorboard package).
        wandb_project: also log to this Weights & Biases project (needs wandb); null disables it.
        progress: show a progress bar on rank 0.
        reward: how responses are scored (dsrl_fast.reward.get_reward_fn): "hendrycks_math" (the MATH dataset's
            published string check on the last \\boxed{}, which the paper's authors trained with: the default, to
            reproduce their negatives), "math_verify" (math-verify equivalence: accepts more answers, so fewer
            samples are negative) or "package.module:function" (any callable (responses, references) -> scores).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    steps: int | None = None
    epochs: int | None = 6
    prompts_per_step: int = 128
    seed: int = 0
    output_dir: str = "runs/dsrl"
    log_every: int = 1
    eval_every: int = 20
    eval_greedy: bool = False
    eval_n: int = 1
    eval_benchmarks: str | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    resume_changes: str = "refuse"
    overwrite: bool = False
    log_samples: int = 4
    tensorboard: bool = False
    wandb_project: str | None = None
    progress: bool = True
    reward: str = "hendrycks_math"

    def _check(self) -> None:
        check_reward_spec(self.reward)
        check_choice("resume_changes", self.resume_changes, RESUME_CHANGES)
        for name in ("steps", "epochs", "prompts_per_step", "log_every", "keep_checkpoints", "eval_n"):
            self._min(name, 1)
        for name in ("seed", "eval_every", "checkpoint_every", "log_samples"):
            self._min(name, 0)
        if not self.output_dir.strip():
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        check_not_empty("wandb_project", self.wandb_project)
        if self.model.name_or_path is not None and self.data.train_path is None:
            raise ValueError(
                f"data.train_path is required when model.name_or_path is set (got null with model.name_or_path="
                f"{self.model.name_or_path!r}; toy problems go with the embedded toy model): pass "
                f"data.train_path=<file.jsonl | file.parquet | hf:<dataset>[:<split>]>"
            )
        longest = self.data.max_prompt_len + self.rollout.max_response_len
        if self.optim.max_tokens_per_micro_batch < longest:
            raise ValueError(
                f"optim.max_tokens_per_micro_batch must be >= data.max_prompt_len + rollout.max_response_len "
                f"({longest}) so the longest sequence fits a micro-batch, got {self.optim.max_tokens_per_micro_batch}"
            )
        if self.sft.steps > 0 and self.model.name_or_path is not None:
            raise ValueError(f"sft.steps must be 0 with a pretrained model (the supervised warm-up is the toy task's), "
                             f"got {self.sft.steps} with model.name_or_path={self.model.name_or_path!r}")
        if self.sft.target_accuracy is not None and self.data.train_path is None \
                and self.sft.eval_size >= self.data.toy_train_size:
            raise ValueError(f"sft.eval_size must be < data.toy_train_size ({self.data.toy_train_size}): the warm-up "
                             f"checks on training problems it keeps out of its own data, got {self.sft.eval_size}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite must not both be true: resume continues the run in output_dir, "
                             "overwrite deletes it")
        guarded = ("dsrl",) if self.guard.action == "switch" else ("dsrl", "prerl", "nsr_prerl", "psr_prerl")
        if self.guard.enabled and self.algo.algo not in guarded:
            raise ValueError(f"guard limits with guard.action={self.guard.action!r} need a marginal phase to act on: "
                             f"algo.algo must be one of {guarded}, got {self.algo.algo!r}")
        if self.optim.mini_batches > self.prompts_per_step:
            raise ValueError(f"optim.mini_batches must be <= prompts_per_step ({self.prompts_per_step}): each "
                             f"mini-batch holds whole prompt groups, got {self.optim.mini_batches}")
        if self.steps is None and self.epochs is None:
            raise ValueError("steps must be set when epochs is null (the run needs a length), got steps=null")


def embedded_default() -> TrainConfig:
    """The CPU demo run: the embedded toy model learning 2-digit addition, DSRL with a supervised warm-up.

    Its settings (plain template, lr 1e-4 with a marginal lr of 1e-5, 16-token responses, loss coefficient 1,
    switch at 50, a warm-up until a check's sampled accuracy reaches 0.2 (at most 1000 steps), 8 responses per
    held-out problem so pass@k shows, an evaluation every 175 steps) suit the toy only; a config naming model.name_or_path starts from the dataclass
    defaults instead, which are the paper's setup (see :func:`paper_default`).
    """
    return TrainConfig(
        model=ModelConfig(name_or_path=None, gradient_checkpointing=False),
        data=DataConfig(train_path=None, template="plain", eval_size=200),
        rollout=RolloutConfig(engine="hf", n=8, temperature=1.0, max_response_len=16),
        algo=AlgoConfig(algo="dsrl", switch_step=50, pretrain_loss_coef=1.0, clip_ratio_c=10.0),
        optim=OptimConfig(lr=1e-4, marginal_lr=1e-5, weight_decay=0.0),
        sft=SFTConfig(steps=1000, batch_size=128, lr=3e-3, target_accuracy=0.2, eval_every=25, eval_size=200),
        steps=700,
        epochs=None,
        prompts_per_step=16,
        output_dir="runs/demo",
        eval_every=175,
        eval_n=8,
        checkpoint_every=100,
        reward="math_verify",
    )


def paper_default(name_or_path: str, train_path: str) -> TrainConfig:
    """The paper's DSRL setup (DESIGN §1/§7) for `name_or_path` trained on `train_path`: the dataclass defaults.

    128 prompts × 8 rollouts, temperature 1.0, prompts ≤ 1024 and responses ≤ 8192 tokens, AdamW lr 1e-6, on-policy,
    NSR-PreRL (marginal, negatives only, loss × 0.01) for 19 updates then GRPO, clip 0.2/0.2, dual clip 10,
    token-mean, no KL or entropy bonus, vLLM rollouts, 6 epochs with drop_last.
    """
    return TrainConfig(model=ModelConfig(name_or_path=name_or_path), data=DataConfig(train_path=train_path))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as nested plain dicts/lists/scalars (YAML- and JSON-safe; tuples become lists)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    return to_plain(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (load_config(path, []) gives it back); parent directories are created."""
    data = config_to_dict(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The run config: YAML file `path` (null: embedded_default()) with dotted `key=value` overrides applied.

    Raises FileNotFoundError for a missing file, ValueError for an unknown key or a bad value, TypeError for a
    value of the wrong type; every message names the dotted key.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")
    if path is None:
        data = config_to_dict(embedded_default() if _names_no_model(overrides) else TrainConfig())
    else:
        data = read_yaml(path, TrainConfig)
    return build(TrainConfig, data, overrides)


def _names_no_model(overrides: Sequence[str]) -> bool:
    """True unless the overrides set model.name_or_path to a model (the toy demo's settings then do not apply)."""
    probe: dict[str, Any] = {}
    for item in overrides:
        if isinstance(item, str) and item.partition("=")[0].strip() == "model.name_or_path":
            apply_override(TrainConfig, probe, item)
    return probe.get("model", {}).get("name_or_path") is None


def list_presets() -> tuple[str, ...]:
    """Names of the shipped presets (for preset_path)."""
    return tuple(sorted(p.stem for p in _PRESET_DIR.glob("*.yaml")))


def preset_path(name: str) -> str:
    """Path of the shipped preset `name` (e.g. "qwen3_4b_math"; a ".yaml" suffix is optional)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    stem = name.removesuffix(".yaml")
    path = _PRESET_DIR / f"{stem}.yaml"
    if not path.is_file():
        raise ValueError(f"name must be one of the presets {list_presets()}, got {name!r}")
    return str(path)


def config_help() -> str:
    """Every config key with its type, the paper-setup default and its documentation, one block per key."""
    return describe(TrainConfig)
