"""Trainer config: defaults, docs, YAML round-trip, typed dotted overrides, error messages, presets."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import yaml

from dsrl_fast.rl.config import GuardConfig
from dsrl_fast.train.config import (
    AlgoConfig,
    CriticConfig,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    SFTConfig,
    TrainConfig,
    config_to_dict,
    embedded_default,
    list_presets,
    config_help,
    load_config,
    paper_default,
    preset_path,
    save_config,
)

SECTIONS = (ModelConfig, DataConfig, RolloutConfig, AlgoConfig, OptimConfig, DeepSpeedConfig, CriticConfig, GuardConfig,
            SFTConfig, TrainConfig)
MATH = "data.train_path=/data/math/train.jsonl"


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_defaults_valid_and_every_field_documented(cls):
    cfg = cls()
    doc = cls.__doc__
    for f in fields(cls):
        assert f"{f.name}:" in doc or f" {f.name}," in doc, f"{cls.__name__}.{f.name} has no docstring entry"
        assert getattr(cfg, f.name) is not None or f.default is None


def test_embedded_default_is_the_no_file_config():
    cfg = load_config(None, [])
    assert cfg == embedded_default()
    assert cfg.model.name_or_path is None and cfg.data.train_path is None
    assert (cfg.rollout.engine, cfg.rollout.n, cfg.prompts_per_step, cfg.rollout.max_response_len) == ("hf", 8, 16, 16)
    assert (cfg.algo.algo, cfg.algo.switch_step, cfg.algo.pretrain_loss_coef) == ("dsrl", 50, 1.0)
    assert (cfg.optim.lr, cfg.optim.marginal_lr, cfg.steps, cfg.checkpoint_every) == (1e-4, 1e-5, 700, 100)
    assert (cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr) == (1000, 128, 3e-3)
    # The warm-up runs until a check reaches 0.2 (at most 1000 steps); 8 responses per problem show pass@k.
    assert (cfg.sft.target_accuracy, cfg.sft.eval_every, cfg.sft.eval_size) == (0.2, 25, 200)
    assert (cfg.eval_n, cfg.eval_every) == (8, 175)
    assert cfg.deepspeed.enabled is None and cfg.output_dir == "runs/demo"  # the automatic setting, as the paper's


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["algo.marginal_prefix=[151644, 7]", "optim.betas=[0.8, 0.95]", "algo.clip_high=0.28",
                             "wandb_project=proj", "deepspeed.enabled=null", "seed=7"])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path, []) == cfg
    data = yaml.safe_load(path.read_text())
    assert data["algo"]["marginal_prefix"] == [151644, 7] and data["optim"]["betas"] == [0.8, 0.95]
    json.dumps(config_to_dict(cfg))


def test_yaml_file_over_dataclass_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nalgo:\n  switch_step: 2\n  clip_low: 1.0e-1\noptim:\n  lr: 1e-5\nsft:\n")
    cfg = load_config(path, ["steps=9"])
    assert cfg.steps == 9 and cfg.algo.switch_step == 2 and cfg.algo.clip_low == 0.1
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # PyYAML reads 1e-5 as a string
    assert cfg.prompts_per_step == TrainConfig().prompts_per_step and cfg.sft == SFTConfig()


@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        ("steps=50", lambda c: c.steps, 50),
        ("algo.switch_step=10", lambda c: c.algo.switch_step, 10),
        ("optim.lr=3e-5", lambda c: c.optim.lr, 3e-5),
        ("optim.lr=1", lambda c: c.optim.lr, 1.0),
        ("rollout.temperature=0.7", lambda c: c.rollout.temperature, 0.7),
        ("model.gradient_checkpointing=true", lambda c: c.model.gradient_checkpointing, True),
        ("eval_greedy=yes", lambda c: c.eval_greedy, True),
        ("data.template=chat", lambda c: c.data.template, "chat"),
        ("data.template=qwen3", lambda c: c.data.template, "qwen3_non_thinking"),
        ("data.template=Q: {problem} A:", lambda c: c.data.template, "Q: {problem} A:"),
        ("output_dir=runs/x y", lambda c: c.output_dir, "runs/x y"),
        ("wandb_project=2024", lambda c: c.wandb_project, "2024"),
        ("data.train_path=hf:org/math:train", lambda c: c.data.train_path, "hf:org/math:train"),
        ("algo.clip_ratio_c=null", lambda c: c.algo.clip_ratio_c, None),
        ("algo.agg=seq-mean-token-sum-norm", lambda c: c.algo.agg, "seq-mean-token-sum-norm"),
        ("algo.marginal_prefix=[151644]", lambda c: c.algo.marginal_prefix, (151644,)),
        ("optim.betas=[0.9, 0.95]", lambda c: c.optim.betas, (0.9, 0.95)),
        ("deepspeed.enabled=true", lambda c: c.deepspeed.enabled, True),
    ],
)
def test_override_types(override, get, expected):
    value = get(load_config(None, [override]))
    assert value == expected and type(value) is type(expected)


def test_toy_pairs_bound_only_with_toy_data():
    assert load_config(None, ["data.toy_train_size=7900"]).data.toy_train_size == 7900
    assert load_config(None, ["data.toy_train_size=8100", "data.eval_path=eval.jsonl"]).data.toy_train_size == 8100
    cfg = load_config(None, ["data.toy_train_size=90000", "data.train_path=train.jsonl"])
    assert cfg.data.toy_train_size == 90000


def test_override_order_and_null_name(tmp_path):
    cfg = load_config(preset_path("qwen3_4b_math"), [MATH, "model.name_or_path=null", "data.train_path=null",
                                                     "steps=3", "steps=4"])
    assert cfg.model.name_or_path is None and cfg.data.train_path is None and cfg.steps == 4


@pytest.mark.parametrize(
    ("override", "error", "parts"),
    [
        ("algo.swtich_step=3", ValueError, ["'algo.swtich_step'", "valid keys of algo", "switch_step"]),
        ("stepz=3", ValueError, ["'stepz'", "valid keys", "prompts_per_step"]),
        ("algo=3", ValueError, ["'algo' is a section", "algo.switch_step"]),
        ("steps.x=3", ValueError, ["'steps.x'", "'steps' is a value"]),
        ("steps", ValueError, ["key=value"]),
        ("=3", ValueError, ["key=value"]),
        ("steps=abc", TypeError, ["steps must be int", "'abc'"]),
        ("steps=1.5", TypeError, ["steps must be int", "1.5"]),
        ("optim.lr=true", TypeError, ["optim.lr must be float", "True"]),
        ("optim.lr=fast", TypeError, ["optim.lr must be float", "'fast'"]),
        ("model.gradient_checkpointing=2", TypeError, ["model.gradient_checkpointing must be bool", "2"]),
        ("algo.marginal_prefix=[1, x]", TypeError, ["algo.marginal_prefix must be a list of int values or null"]),
        ("optim.betas=[0.9]", TypeError, ["optim.betas must be a list of 2 float values", "[0.9]"]),
        ("steps=null", ValueError, ["steps must be set when epochs is null", "got steps=null"]),
        ("algo.algo=trpo", ValueError, ["algo.algo must be one of", "'dsrl'", "'trpo'"]),
        ("algo.switch_step=-1", ValueError, ["algo.switch_step must be >= 0", "-1"]),
        ("algo.marginal_prefix=[]", ValueError, ["algo.marginal_prefix must be a non-empty list"]),
        ("algo.marginal_prefix=[-3]", ValueError, ["algo.marginal_prefix[0] must be >= 0", "-3"]),
        ("algo.clip_low=1.0", ValueError, ["algo.clip_low must be < 1.0"]),
        ("algo.clip_ratio_c=1.0", ValueError, ["algo.clip_ratio_c must be > 1.0"]),
        ("algo.agg=sum", ValueError, ["algo.agg must be one of", "'sum'"]),
        ("algo.kl_type=k4", ValueError, ["algo.kl_type"]),
        ("algo.marginal_advantage=std", ValueError, ["algo.marginal_advantage"]),
        ("optim.lr=0", ValueError, ["optim.lr must be > 0.0", "0.0"]),
        ("optim.lr=.nan", ValueError, ["optim.lr must be a finite number"]),
        ("optim.betas=[0.9, 1.0]", ValueError, ["optim.betas[1] must be < 1.0"]),
        ("optim.schedule=linear", ValueError, ["optim.schedule must be one of"]),
        ("optim.min_lr_ratio=2", ValueError, ["optim.min_lr_ratio must be <= 1.0"]),
        ("optim.max_tokens_per_micro_batch=512", ValueError, ["optim.max_tokens_per_micro_batch must be >=", "1040"]),
        ("rollout.temperature=0", ValueError, ["rollout.temperature must be > 0.0"]),
        ("rollout.top_p=1.5", ValueError, ["rollout.top_p must be <= 1.0", "1.5"]),
        ("rollout.top_p=0", ValueError, ["rollout.top_p must be > 0.0"]),
        ("rollout.n=0", ValueError, ["rollout.n must be >= 1", "0"]),
        ("rollout.engine=sglang", ValueError, ["rollout.engine must be one of", "'sglang'"]),
        ("model.dtype=fp8", ValueError, ["model.dtype must be one of", "'fp8'"]),
        ("model.attention_backend=sdpa", ValueError, ["model.attention_backend"]),
        ("model.name_or_path=Qwen/Qwen3-4B", ValueError, ["data.train_path is required", "'Qwen/Qwen3-4B'"]),
        ("data.train_path=train.csv", ValueError, ["data.train_path must be a path ending in .jsonl or .parquet"]),
        ("data.eval_path=hf:", ValueError, ["data.eval_path must name a dataset"]),
        ("data.template=qwen", ValueError, ["data.template must be one of", "containing '{problem}'", "'qwen'"]),
        ("data.toy_high=5", ValueError, ["data.toy_high must be >= data.toy_low"]),
        ("data.toy_train_size=8000", ValueError, ["data.toy_train_size must be <= 7900", "eval_size=200", "8000"]),
        ("data.answer_key= ", TypeError, ["data.answer_key must be str"]),
        ("deepspeed.zero_stage=4", ValueError, ["deepspeed.zero_stage must be one of", "4"]),
        ("deepspeed.offload_params=true", ValueError, ["deepspeed.offload_params=true needs deepspeed.zero_stage 3"]),
        ("sft.batch_size=0", ValueError, ["sft.batch_size must be >= 1"]),
        ("sft.target_accuracy=0", ValueError, ["sft.target_accuracy must be > 0.0, got 0"]),
        ("sft.target_accuracy=1.5", ValueError, ["sft.target_accuracy must be <= 1.0, got 1.5"]),
        ("sft.eval_every=0", ValueError, ["sft.eval_every must be >= 1, got 0"]),
        ("sft.eval_size=7000", ValueError, ["sft.eval_size must be < data.toy_train_size (7000)", "got 7000"]),
        ("steps=0", ValueError, ["steps must be >= 1", "0"]),
        ("keep_checkpoints=0", ValueError, ["keep_checkpoints must be >= 1"]),
        ("eval_every=-1", ValueError, ["eval_every must be >= 0"]),
        ("wandb_project=''", ValueError, ["wandb_project must be a non-empty string"]),
        ("resume_changes=yes", ValueError, ["resume_changes must be one of ('refuse', 'allow'), got 'yes'"]),
        ("data.empty_answers=drop", ValueError, ["data.empty_answers must be one of ('error', 'skip'), got 'drop'"]),
    ],
)
def test_bad_overrides_name_the_key(override, error, parts):
    with pytest.raises(error) as exc:
        load_config(None, [override])
    for part in parts:
        assert part in str(exc.value), (part, str(exc.value))


def test_bad_yaml_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  swtich_step: 3\n")
    with pytest.raises(ValueError, match=r"'algo\.swtich_step'.*valid keys of algo: algo, switch_step"):
        load_config(path, [])
    path.write_text("model: Qwen/Qwen3-4B\n")
    with pytest.raises(TypeError, match=r"model must be a mapping of ModelConfig fields, got str 'Qwen/Qwen3-4B'"):
        load_config(path, [])
    path.write_text("- 1\n- 2\n")
    with pytest.raises(TypeError, match="must hold a mapping"):
        load_config(path, [])
    path.write_text("optim:\n  betas: [0.9, 0.99, 0.5]\n")
    with pytest.raises(TypeError, match="optim.betas must be a list of 2 float values"):
        load_config(path, [])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml", [])
    with pytest.raises(TypeError, match="sequence of 'key=value' strings"):
        load_config(None, "steps=3")


def test_direct_construction_checks():
    cfg = TrainConfig(algo={"switch_step": 5}, optim={"betas": [0.5, 0.6]})
    assert cfg.algo == AlgoConfig(switch_step=5) and cfg.optim.betas == (0.5, 0.6)
    with pytest.raises(ValueError, match="unknown config key 'algo.bogus'"):
        TrainConfig(algo={"bogus": 1})
    with pytest.raises(TypeError, match="model must be a mapping of ModelConfig fields"):
        TrainConfig(model="Qwen/Qwen3-4B")
    with pytest.raises(ValueError, match="sft.steps must be 0 with a pretrained model"):
        TrainConfig(model=ModelConfig(name_or_path="m"), data={"train_path": "t.jsonl"}, sft={"steps": 5})
    with pytest.raises(ValueError, match=r"sft.steps must be >= 1 \(the cap\) with sft.target_accuracy set, got 0"):
        TrainConfig(sft={"steps": 0, "target_accuracy": 0.3})
    with pytest.raises(ValueError, match="resume and overwrite must not both be true"):
        TrainConfig(resume=True, overwrite=True)
    with pytest.raises(ValueError, match="steps must be set when epochs is null"):
        TrainConfig(steps=None, epochs=None)
    with pytest.raises(ValueError, match="data.prompt_overflow must be one of"):
        TrainConfig(data={"prompt_overflow": "cut"})
    assert DeepSpeedConfig(zero_stage=3, offload_params=True, offload_optimizer=True).offload_params


@pytest.mark.parametrize("name", ["qwen3_4b_math", "qwen3_8b_math"])
def test_presets(name, tmp_path):
    assert name in list_presets()
    path = preset_path(name)
    assert preset_path(name + ".yaml") == path
    with pytest.raises(ValueError, match="data.train_path is required when model.name_or_path is set"):
        load_config(path, [])
    cfg = load_config(path, [MATH])
    size = name.split("_")[1].upper()
    assert cfg.model.name_or_path == f"Qwen/Qwen3-{size}" and cfg.data.train_path == "/data/math/train.jsonl"
    assert (cfg.prompts_per_step, cfg.rollout.n, cfg.rollout.temperature) == (128, 8, 1.0)
    assert (cfg.rollout.max_response_len, cfg.data.max_prompt_len, cfg.rollout.engine) == (8192, 1024, "vllm")
    # the authors' 19 marginal updates and 6 epochs of MATH with drop_last (348 steps on 7,500 problems)
    assert (cfg.algo.algo, cfg.algo.switch_step, cfg.algo.pretrain_loss_coef) == ("dsrl", 19, 0.01)
    assert (cfg.steps, cfg.epochs) == (None, 6)
    assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.clip_ratio_c) == (0.2, 0.2, 10.0)
    assert (cfg.optim.lr, cfg.deepspeed.zero_stage, cfg.model.dtype) == (1e-6, 2, "bfloat16")
    assert cfg.data.template == "qwen3_non_thinking" and cfg.algo.kl_coef == 0.0
    # Validation curves by default: MATH-500 before, every 20 steps during and after RL.
    assert (cfg.data.eval_path, cfg.data.eval_answer_key, cfg.eval_every) == ("hf:HuggingFaceH4/MATH-500:test",
                                                                              "answer", 20)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml", []) == cfg


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"presets \(.*'qwen3_4b_math'.*\), got 'llama'"):
        preset_path("llama")


def test_a_named_model_starts_from_the_paper_setup_not_the_toy_demo():
    """`dsrl-fast train model.name_or_path=X data.train_path=Y` is a faithful run: none of the toy's settings."""
    cfg = load_config(None, ["model.name_or_path=Qwen/Qwen3-4B", MATH])
    assert cfg == paper_default("Qwen/Qwen3-4B", "/data/math/train.jsonl")
    assert (cfg.optim.lr, cfg.optim.marginal_lr, cfg.rollout.max_response_len) == (1e-6, None, 8192)
    assert (cfg.algo.pretrain_loss_coef, cfg.algo.switch_step, cfg.sft.steps) == (0.01, 19, 0)
    assert (cfg.data.template, cfg.rollout.engine, cfg.prompts_per_step) == ("qwen3_non_thinking", "vllm", 128)
    assert (cfg.steps, cfg.epochs, cfg.model.gradient_checkpointing) == (None, 6, True)
    # overrides still apply on top, in order, and a null name keeps the toy base
    assert load_config(None, ["model.name_or_path=m", MATH, "optim.lr=2e-6"]).optim.lr == 2e-6
    assert load_config(None, ["model.name_or_path=m", "model.name_or_path=null"]) == embedded_default()


def test_config_help_documents_every_key():
    text = config_help()
    keys = [line.split(" (")[0].strip() for line in text.splitlines() if line.startswith("  ") and
            not line.startswith("      ")]
    sections = {f.name: f.type for f in fields(TrainConfig) if f.name in {c.SECTION for c in SECTIONS}}
    expected = [f.name for f in fields(TrainConfig) if f.name not in sections]
    expected += [f"{name}.{f.name}" for name, cls in zip(sections, SECTIONS) for f in fields(cls)]
    assert set(expected) <= set(keys), set(expected) - set(keys)
    docs = dict(zip(keys, [line.strip() for line in text.splitlines() if line.startswith("      ")]))
    assert all(docs.values()), [k for k, v in docs.items() if not v]
    assert "algo.switch_step (int, default 19)" in text and "19 marginal updates" in docs["algo.switch_step"]


def test_the_toy_under_torchrun_is_not_refused_for_a_value_the_user_never_typed():
    """The embedded default used to set deepspeed.enabled=false, so `torchrun --nproc_per_node 2 -m dsrl_fast.cli
    train` stopped with "... got false". A stand-in for that launch: check_requirements with WORLD_SIZE=2 (a real
    2-process CPU run of the toy compiles DeepSpeed's shm op and takes ~3 minutes, too long for CI)."""
    pytest.importorskip("deepspeed", reason="the distributed path needs deepspeed (the train extra)")
    from dsrl_fast.errors import UserError
    from dsrl_fast.train.setup import check_requirements

    toy = load_config(None, [])
    check_requirements(toy, world_size=2)
    check_requirements(toy, world_size=1)
    with pytest.raises(UserError, match=r"deepspeed.enabled must be true or null with WORLD_SIZE=2 .*got false"):
        check_requirements(load_config(None, ["deepspeed.enabled=false"]), world_size=2)
    with pytest.raises(ValueError, match="deepspeed offloading needs deepspeed.enabled true or null, got false"):
        load_config(None, ["deepspeed.enabled=false", "deepspeed.offload_optimizer=true"])
    with pytest.raises(UserError, match=r"^deepspeed.offload_optimizer=true needs DeepSpeed, which one process runs "
                                        r"only with deepspeed.enabled=true .*got deepspeed.enabled=null$"):
        check_requirements(load_config(None, ["deepspeed.offload_optimizer=true"]), world_size=1)
    check_requirements(load_config(None, ["deepspeed.offload_optimizer=true"]), world_size=2)


def test_a_16_bit_model_on_deepspeed_stage_0_is_refused_before_the_model_loads():
    """DeepSpeed accumulates a 16-bit model's gradients in fp32 only under ZeRO; the updater refused stage 0 only
    after the model had loaded and the warm-up had run (a ValueError traceback). Now one line before heavy work."""
    pytest.importorskip("deepspeed", reason="the DeepSpeed path needs deepspeed (the train extra)")
    from dsrl_fast.errors import UserError
    from dsrl_fast.train.setup import check_requirements

    for dtype in ("bfloat16", "float16"):
        cfg = load_config(None, ["deepspeed.enabled=true", "deepspeed.zero_stage=0", f"model.dtype={dtype}"])
        with pytest.raises(UserError, match=rf"^deepspeed.zero_stage must be >= 1 for a {dtype} model .*got 0$"):
            check_requirements(cfg, world_size=1)
    check_requirements(load_config(None, ["deepspeed.enabled=true", "deepspeed.zero_stage=0",
                                          "model.dtype=float32"]), world_size=1)
