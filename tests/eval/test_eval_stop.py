"""`dsrl-fast eval` stops at once on SIGINT/SIGTERM, with the trainer's handlers (StopRequest with `stop_now`): a cache
write is never cut, the command prints one line and exits with 128 + the signal number, and a rerun continues from
the cached problems."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from dsrl_fast.errors import RunAborted, RunStopped
from dsrl_fast.eval.benchmarks import parse_data_specs
from dsrl_fast.eval.cache import GenerationCache
from dsrl_fast.cli.eval import EvalInterrupted
from dsrl_fast.eval.config import parse_overrides
from dsrl_fast.eval.models import ModelSpec
from dsrl_fast.eval.runner import load_eval_sets, run_eval
from dsrl_fast.interrupt import StopRequest
from tests.eval.test_eval import DATA_DIR, CountingOpen, build_text_model, needs_data, parity_reward
from tests.paths import REPO_ROOT


class Stopped(RunStopped):
    def __init__(self, signum: int):
        super().__init__(signum, f"stopped by {signum}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_now_raises_at_once_but_never_inside_a_deferred_block(signum):
    before = signal.getsignal(signum)
    steps = []
    with pytest.raises(Stopped) as stopped, StopRequest(stop_now=Stopped) as stop:
        os.kill(os.getpid(), signum)
        steps.append("after the signal")  # never runs: the handler raised
    assert steps == [] and stopped.value.exit_code == 128 + signum

    with pytest.raises(Stopped), StopRequest(stop_now=Stopped) as stop:
        with stop.deferred():
            os.kill(os.getpid(), signum)
            steps.append("the write ends")
        steps.append("after the block")  # never runs: the block raised on its way out
    assert steps == ["the write ends"] and stop.signum == signum

    # a second signal inside the block stops at once (the user insists)
    with pytest.raises(Stopped), StopRequest(stop_now=Stopped) as stop:
        with stop.deferred():
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
            steps.append("cut")
    assert steps == ["the write ends"]
    assert signal.getsignal(signum) is before  # the previous handler is back


def test_training_behaviour_is_unchanged(capsys):
    with pytest.raises(RunAborted), StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the first signal only asks
        with stop.deferred():  # no effect without stop_now
            pass
        os.kill(os.getpid(), signal.SIGTERM)
    assert "saving a checkpoint after this step" in capsys.readouterr().err


def _options(limit: int) -> list[str]:
    return [f"limit={limit}", "max_new_tokens=8", "engine=hf", "progress=false", f"data_dir={DATA_DIR}",
            "batch_size=1", "reward=exact_match", "n=2", "ks=1,2"]


@needs_data
def test_a_background_eval_stops_on_sigint_and_a_rerun_continues(tmp_path, caplog):
    """A real `dsrl-fast eval` process started as a shell starts a background job (SIGINT ignored): SIGINT stops it
    at once with one line and exit status 130; its cache is intact and a rerun generates only the missing problems."""
    model = build_text_model(tmp_path / "model", seed=0)
    out = tmp_path / "out"
    cache = out / "generations" / "m" / "math500.jsonl"
    root = REPO_ROOT
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "dsrl_fast.cli", "eval", "--model", f"m={model}", "--data", "math500",
                             "--output", str(out), *_options(200)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 180
        while not (cache.is_file() and cache.read_text(encoding="utf-8").count("\n") >= 3):  # 2 problems cached
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert lines[-1].startswith(f"dsrl-fast eval: stopped by SIGINT: the problems finished so far are cached in "
                                f"{out / 'generations'}; the same command continues from them"), err
    assert sum("SIGINT" in line for line in lines) == 1
    assert waited < 30, waited  # 200 problems would take minutes; a generation call takes about a second

    with caplog.at_level(logging.WARNING, logger="dsrl_fast.eval.cache"):
        cached = [json.loads(line)["index"] for line in cache.read_text(encoding="utf-8").splitlines()[1:]]
        assert cached == list(range(len(cached))) and len(cached) >= 2
        cfg = parse_overrides(_options(len(cached) + 2))
        opener = CountingOpen()
        run_eval([ModelSpec("m", str(model))], load_eval_sets(parse_data_specs("math500"), cfg), cfg, out,
                 open_fn=opener)
    assert caplog.text == ""  # the stop left no damaged line
    assert (opener.opened, opener.prompts) == (1, 2)  # only the two problems the stopped run had not reached
    assert cache.read_text(encoding="utf-8").count("\n") == 1 + len(cached) + 2


@needs_data
def test_sigterm_during_a_cache_write_lets_it_end(tmp_path, monkeypatch):
    """In process: SIGTERM arrives while a batch is being appended; the batch is written whole, then the run stops
    (exit status 143) and the file holds only complete, valid lines."""
    model = build_text_model(tmp_path / "model", seed=0)
    out = tmp_path / "out"
    append = GenerationCache.append
    calls = []

    def append_then_signal(self, records):
        calls.append(len(records))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives before the write starts
        append(self, records)

    monkeypatch.setattr(GenerationCache, "append", append_then_signal)
    cfg = parse_overrides(_options(5))
    sets = load_eval_sets(parse_data_specs("math500"), cfg)
    with pytest.raises(EvalInterrupted) as stopped, \
            StopRequest(stop_now=lambda signum: EvalInterrupted(signum, str(out))) as stop:
        run_eval([ModelSpec("m", str(model))], sets, cfg, out, reward_fn=parity_reward, stop=stop)
    assert stopped.value.exit_code == 143 and calls == [1, 1]
    lines = (out / "generations" / "m" / "math500.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["index"] for line in lines[1:]] == [0, 1]  # the second batch was written whole
