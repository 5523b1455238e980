"""One run per output directory (the run lock, with real concurrent processes) and resumes that check what they
change against the run's saved config (refused, allowed, recorded; config.yaml never rewritten)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers", reason="the trainer runs a transformers model (the train extra)")

from dsrl_fast.data.problems import PromptSampler
from dsrl_fast.errors import UserError
from dsrl_fast.train.checkpoint import checkpoint_dir
from dsrl_fast.train.config import config_help, load_config, save_config
from dsrl_fast.train.resume_check import (
    FIXED_KEYS,
    IGNORED_KEYS,
    SAFE_KEYS,
    check_resume,
    config_history,
    flat_config,
    record_resume,
)
from dsrl_fast.train.run_dir import LOCK_FILE, lock_output_dir, prepare_output_dir
from dsrl_fast.train.components import Dist
from dsrl_fast.train.run import claim_output_dir, load_sampler_state
from tests.toy_runs import BASE, run
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread", "toy_reward", "shared_warmup")
# The smallest toy run that trains: 2 steps, a short warm-up.
TINY = (*BASE, "steps=2", "sft.steps=20", "checkpoint_every=1")


def _cli(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dsrl_fast.cli", *args], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- the run lock --------------------------------------------------------------------------------------------------


def test_two_runs_started_at_once_into_one_directory_one_is_refused(tmp_path: Path) -> None:
    """Two `dsrl-fast train` processes launched together: one trains to the end, the other stops in one line with
    exit status 2 naming the first (before the lock, both were accepted and the first died in its plot)."""
    args = ("train", *TINY, "sft.steps=100", f"output_dir={tmp_path}")
    procs = [_cli(*args), _cli(*args)]
    outputs = [p.communicate(timeout=300) for p in procs]
    results = [(p.pid, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    winners = [r for r in results if r[1] == 0]
    losers = [r for r in results if r[1] != 0]
    assert len(winners) == 1 and len(losers) == 1, [(r[1], r[3][-1500:]) for r in results]
    (winner_pid, _, winner_out, _), (_, code, _, err) = winners[0], losers[0]
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"dsrl-fast train: error: output_dir {str(tmp_path)!r} is in use by another run (pid "
                               f"{winner_pid} on host {socket.gethostname()}, started "), lines[0]
    assert "held-out accuracy: " in winner_out and (tmp_path / "training.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
    assert not (tmp_path / LOCK_FILE).exists(), "the lock is removed when the run ends"


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dsrl_fast.train.run_dir import "
                               "lock_output_dir\nlock = lock_output_dir(sys.argv[1])\nprint('locked', flush=True)\n"
                               "time.sleep(600)", str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    with pytest.raises(UserError, match=rf"is in use by another run \(pid {holder.pid} on host "):
        lock_output_dir(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid, "a killed run leaves its lock file"
    with lock_output_dir(tmp_path) as lock:
        assert lock.holder.pid == os.getpid()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert f"taking over the lock of a run that is gone (pid {holder.pid} on host {socket.gethostname()}" in out
    assert f"pid {holder.pid} is not running)" in out
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_of_a_pid_that_does_not_exist_is_taken_over(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pid = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "yesterday"}))
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}"])
    _, lock, _ = claim_output_dir(cfg, Dist(0, 1, "cpu"))  # type: ignore[arg-type]
    assert lock is not None and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a run that is gone (pid {pid} on host {socket.gethostname()}, started " \
           f"yesterday; pid {pid} is not running)" in capsys.readouterr().out
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_refused_naming_its_holder(tmp_path: Path) -> None:
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps({"pid": 4242, "host": "node-7", "started": "2026-12-01T10:00:00+00:00"}))
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match=r"is locked by a run on another host \(pid 4242 on host node-7, started "
                                        r"2026-12-01T10:00:00\+00:00\), which cannot be checked from .*: if that run "
                                        rf"is over, delete {str(lock_file)!r}"):
        run(tmp_path, *TINY)
    assert _snapshot(tmp_path) == before


def test_only_rank_0_takes_the_lock(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}"])
    assert claim_output_dir(cfg, Dist(1, 2, "cpu")) == (None, None, None)  # type: ignore[arg-type]
    assert not (tmp_path / LOCK_FILE).exists()
    _, lock, _ = claim_output_dir(cfg, Dist(0, 1, "cpu"))  # type: ignore[arg-type]
    assert lock is not None and (tmp_path / LOCK_FILE).is_file()
    with pytest.raises(UserError, match="is in use by another run"):
        claim_output_dir(cfg, Dist(0, 1, "cpu"))  # type: ignore[arg-type]
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


# --- resume and the saved config -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, toy_reward: None, shared_warmup: None) -> Path:
    out = tmp_path_factory.mktemp("finished")
    run(out, *TINY)
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_resume_with_another_seed_is_one_line_exit_2(finished_run: Path, tmp_path: Path) -> None:
    """It used to die with the sampler's raw ValueError traceback after the model had loaded."""
    out = _copy_run(finished_run, tmp_path / "run")
    before = _snapshot(out)
    proc = _cli("train", *TINY, "steps=3", "seed=1", "resume=true", f"output_dir={out}")
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err[-2000:]
    assert lines[0] == (f"dsrl-fast train: error: resume=true cannot change seed 0 -> 1 (saved in "
                        f"{str(out / 'config.yaml')!r}; seed: {FIXED_KEYS['seed']}): resume with seed=0, or start a "
                        "new run in another output_dir")
    assert _snapshot(out) == before


def test_resume_refuses_changes_to_what_the_run_is_with_a_one_line_diff(finished_run: Path, tmp_path: Path) -> None:
    """optim.lr and rollout.n used to be accepted silently, and config.yaml rewritten with the new values."""
    out = _copy_run(finished_run, tmp_path / "run")
    before = _snapshot(out)
    with pytest.raises(UserError) as refused:
        run(out, *TINY, "steps=3", "optim.lr=1e-3", "rollout.n=4", "resume=true")
    assert str(refused.value) == (
        f"resume=true would change what the run is: optim.lr 0.0001 -> 0.001, rollout.n 8 -> 4 (saved in "
        f"{str(out / 'config.yaml')!r}): pass resume_changes=allow to continue with the new values, resume with the "
        "saved ones, or start a new run in another output_dir")
    assert _snapshot(out) == before, "a refused resume writes nothing"


def test_safe_and_allowed_changes_are_recorded_and_config_yaml_is_kept(finished_run: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy_run(finished_run, tmp_path / "run")
    original = (out / "config.yaml").read_bytes()
    run(out, *TINY, "steps=3", "log_every=2", "resume=true")
    assert "resume changes log_every 1 -> 2, steps 2 -> 3; recorded in" in capsys.readouterr().out
    run(out, *TINY, "steps=4", "log_every=2", "optim.lr=2e-4", "resume_changes=allow", "resume=true")
    assert "resume changes optim.lr 0.0001 -> 0.0002, steps 3 -> 4 (1 allowed by resume_changes=allow)" \
        in capsys.readouterr().out
    assert (out / "config.yaml").read_bytes() == original
    history = config_history(out)
    assert [p.name for p in history] == ["config.yaml", "config.resume-1.yaml", "config.resume-2.yaml"]
    first, second = (p.read_text().splitlines()[0] for p in history[1:])
    assert first == "# resume of config.yaml from checkpoints/step_000002; changed: log_every 1 -> 2, steps 2 -> 3"
    assert second == ("# resume of config.resume-1.yaml from checkpoints/step_000003; changed: optim.lr 0.0001 -> "
                      "0.0002, steps 3 -> 4")
    resumed = load_config(history[-1])
    assert (resumed.steps, resumed.optim.lr, resumed.resume) == (4, 2e-4, True)
    # A later resume compares with the newest config: the allowed lr is now the run's own.
    run(out, *TINY, "steps=4", "log_every=2", "optim.lr=2e-4", "resume=true")
    assert config_history(out)[-1].read_text().splitlines()[0].endswith("changed: nothing")


def test_overwrite_removes_the_resume_history(finished_run: Path, tmp_path: Path) -> None:
    out = _copy_run(finished_run, tmp_path / "run")
    (out / "config.resume-1.yaml").write_text("steps: 3\n")
    prepare_output_dir(out, resume=False, overwrite=True)
    assert config_history(out) == [] and not (out / "summary.json").exists()


def test_every_config_key_has_one_resume_kind_and_the_help_names_them() -> None:
    keys = set(flat_config(load_config(None, [])))
    for group in (SAFE_KEYS, set(FIXED_KEYS), IGNORED_KEYS):
        assert set(group) <= keys, set(group) - keys
    assert not (SAFE_KEYS & set(FIXED_KEYS)) and not (SAFE_KEYS & IGNORED_KEYS)
    (block,) = re.findall(r"^  resume_changes \(.*?(?=^  \S)", config_help(), flags=re.M | re.S)
    doc = " ".join(block.split())
    for key in (*SAFE_KEYS, *FIXED_KEYS):
        assert f"{key}," in doc or f"{key} " in doc, key
    refused = keys - SAFE_KEYS - set(FIXED_KEYS) - IGNORED_KEYS
    assert {"optim.lr", "rollout.n", "model.name_or_path", "model.dtype", "data.train_path", "algo.algo", "reward",
            "eval_n"} <= refused


def test_resume_with_deepspeed_null_equals_false_in_one_process(finished_run: Path, tmp_path: Path) -> None:
    """The toy's saved config may say deepspeed.enabled: false (older embedded default) or null: in one process
    both are the plain updater, so a resume does not call it a change."""
    out = _copy_run(finished_run, tmp_path / "run")
    cfg = load_config(None, [*TINY, f"output_dir={out}", "resume=true", "deepspeed.enabled=false"])
    plan = check_resume(cfg, checkpoint_dir(out, 2), world_size=1)
    assert plan.changes == ()
    with pytest.raises(UserError, match="resume=true cannot change deepspeed.enabled true -> false"):
        check_resume(cfg, checkpoint_dir(out, 2), world_size=2)


def test_epochs_may_change_between_numbers_but_not_from_or_to_null(finished_run: Path, tmp_path: Path) -> None:
    """A number of epochs only sets the run's length; null lets batches run across epoch ends (no drop_last)."""
    out = _copy_run(finished_run, tmp_path / "run")
    checkpoint = checkpoint_dir(out, 2)
    with pytest.raises(UserError, match=r"would change what the run is: epochs null -> 3 "):
        check_resume(load_config(None, [*TINY, f"output_dir={out}", "resume=true", "epochs=3"]), checkpoint, 1)
    save_config(load_config(None, [*TINY, f"output_dir={out}", "epochs=2"]), out / "config.yaml")
    plan = check_resume(load_config(None, [*TINY, f"output_dir={out}", "resume=true", "epochs=3"]), checkpoint, 1)
    assert [str(c) for c in plan.changes] == ["epochs 2 -> 3"]


def test_a_run_without_config_yaml_resumes_and_records_its_config(finished_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy_run(finished_run, tmp_path / "run")
    (out / "config.yaml").unlink()
    cfg = load_config(None, [*TINY, f"output_dir={out}", "resume=true", "optim.lr=1e-3"])
    plan = check_resume(cfg, checkpoint_dir(out, 2), 1)
    assert "is missing, so the resumed settings cannot be compared" in capsys.readouterr().out
    record_resume(cfg, plan)
    assert not (out / "config.yaml").exists()
    assert (out / "config.resume-1.yaml").read_text().startswith(
        "# resume of a run without config.yaml from checkpoints/step_000002; changed: nothing\n")


def test_an_allowed_change_of_the_training_set_is_one_line() -> None:
    sampler = PromptSampler(90, 4, seed=0)
    state: dict[str, Any] = {**PromptSampler(84, 4, seed=0).state_dict()}
    with pytest.raises(UserError, match="resume=true needs the checkpoint's 84 training problems, got 90"):
        load_sampler_state(sampler, state)
