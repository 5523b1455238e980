"""Options of `dsrl-fast eval`: one typed dataclass, set from `key=value` arguments.

Values are parsed as YAML (``limit=20``, ``template=null``, ``top_p=0.95``) and coerced and checked when the dataclass
is built, by the typed-config engine train uses (dsrl_fast/typed_config.py); errors name the key, the expected and the
received value.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import yaml

from dsrl_fast.data.problems import ANSWER_MODES
from dsrl_fast.model.dtypes import DTYPES
from dsrl_fast.typed_config import Section, check_choice, check_not_empty

__all__ = ["DEFAULT_KS", "ENGINES", "EvalConfig", "parse_ks", "parse_overrides"]

ENGINES = ("auto", "hf", "vllm")
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class EvalConfig(Section):
    """How models are sampled and scored.

    Attributes:
        n: samples per problem (Avg@n; Pass@k and maj@k for every asked k <= n). The paper: 32 (Avg@32), 300 (Pass@k).
        ks: the k of Pass@k and maj@k.
        temperature: sampling temperature (the paper: 1.0).
        top_p: nucleus mass (the paper: 1.0).
        max_new_tokens: response length cap, lowered to fit the model's positions when they are fewer. The paper (and
            the authors' validation): 8192, the training response length.
        seed: sampling seed (each batch of problems draws from (seed, its first problem's index)).
        engine: "vllm", "hf" (transformers generate) or "auto" (vLLM on CUDA when installed, else hf).
        dtype: model dtype: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16" or "float16".
        template: prompt template (dsrl_fast.data.templates); null: "plain" for the toy task, else "qwen3_non_thinking",
            the training default.
        add_special_tokens: let the tokenizer add its special tokens (BOS) to the prompt; null: only for the toy task
            (as in training).
        reward: the scorer, a reward spec for dsrl_fast.reward.get_reward_fn. The paper's: "hendrycks_math", the MATH
            string check the authors score with; "math_verify" accepts more forms (0.25 = \\frac{1}{4}), so its
            numbers are higher and not comparable with the paper's.
        limit: evaluate only the first `limit` problems of each benchmark; null: all.
        batch_size: problems per generation call (each finished batch is cached).
        data_dir: directory holding benchmarks/<name>/test.jsonl; null: $DSRL_FAST_DATA, else ./data.
        problem_key / answer_key / answer_mode: fields of user files and Hugging Face datasets ("field", "boxed" or
            "list"); null: the named benchmark's fields, else "problem" / "answer" / "field".
        toy_seed / toy_train_size / toy_eval_size: the toy held-out set: problems toy_train_size ..
            toy_train_size + toy_eval_size of make_addition_problems(seed=toy_seed), the training run's held-out
            problems with the demo's defaults.
        gpu_memory_utilization: vLLM's GPU memory share.
        cpu_kv_cache_gib: vLLM's KV cache on CPU (GiB).
        max_model_len: vLLM's context length; null: the longest prompt plus max_new_tokens, within the model's
            positions.
        progress: show progress bars.
    """

    n: int = 32
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8192
    seed: int = 0
    engine: str = "auto"
    dtype: str = "auto"
    template: str | None = None
    add_special_tokens: bool | None = None
    reward: str = "hendrycks_math"
    limit: int | None = None
    batch_size: int = 64
    data_dir: str | None = None
    problem_key: str | None = None
    answer_key: str | None = None
    answer_mode: str | None = None
    toy_seed: int = 0
    toy_train_size: int = 7000
    toy_eval_size: int = 200
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: int = 4
    max_model_len: int | None = None
    progress: bool = True

    def _check(self) -> None:
        for name in ("n", "max_new_tokens", "batch_size", "toy_train_size", "toy_eval_size", "cpu_kv_cache_gib",
                     "limit", "max_model_len"):
            self._min(name, 1)
        self._min("seed", 0)
        self._min("toy_seed", 0)
        for name in ("template", "reward", "data_dir", "problem_key", "answer_key"):
            check_not_empty(name, getattr(self, name))
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be a non-empty list of ints >= 1, got {list(self.ks)}")
        self.ks = tuple(sorted(set(self.ks)))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        check_choice("engine", self.engine, ENGINES)
        check_choice("dtype", self.dtype, DTYPES)
        if self.answer_mode is not None:
            check_choice("answer_mode", self.answer_mode, ANSWER_MODES)

    def sampling_settings(self) -> dict[str, Any]:
        """The options that decide the generations (a cache made with other values is not reused)."""
        keys = ("n", "temperature", "top_p", "max_new_tokens", "seed", "template", "add_special_tokens")
        return {k: getattr(self, k) for k in keys}


def parse_ks(text: str) -> tuple[int, ...]:
    """k values from "1,2,4,8", or a progression "1,2,4,...,256" / "1,2,3,...,10" (three terms, "...", last)."""
    if not isinstance(text, str):
        raise TypeError(f"k must be a str such as '1,2,4,...,256', got {type(text).__name__}")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if "..." not in parts:
            return tuple(int(p) for p in parts) or _bad_ks(text)
        at = parts.index("...")
        head, tail = [int(p) for p in parts[:at]], [int(p) for p in parts[at + 1:]]
    except ValueError:
        return _bad_ks(text)
    if len(head) < 3 or len(tail) != 1:
        return _bad_ks(text)
    a, b, c = head[-3:]
    last = tail[0]
    if b - a == c - b and b > a:
        values = list(range(head[0], last + 1, b - a))
    elif a > 0 and b % a == 0 and c * a == b * b and b > a:
        values, v = [], head[0]
        while v <= last:
            values.append(v)
            v *= b // a
    else:
        return _bad_ks(text)
    if values[: len(head)] != head or values[-1] != last:
        return _bad_ks(text)
    return tuple(values)


def _bad_ks(text: str) -> tuple[int, ...]:
    raise ValueError(f"k must be comma-separated ints or a progression like '1,2,4,...,256', got {text!r}")


def parse_overrides(overrides: Sequence[str], base: dict[str, Any] | None = None) -> EvalConfig:
    """An EvalConfig from `key=value` strings (values parsed as YAML) over `base` keyword values."""
    names = [f.name for f in fields(EvalConfig)]
    values = dict(base or {})
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"options must look like key=value (e.g. limit=20), got {item!r}")
        if key not in names:
            raise ValueError(f"unknown eval option {key!r}; valid options: {', '.join(names)}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        hint = typing.get_type_hints(EvalConfig)[key]
        if key == "ks":
            value = parse_ks(text) if isinstance(value, (str, int)) else tuple(value or ())
        elif value is not None and (hint is str or str in typing.get_args(hint)) and not isinstance(value, str):
            value = text.strip()  # a string option keeps its literal text: template=123 is the text "123"
        values[key] = value
    return EvalConfig(**values)
