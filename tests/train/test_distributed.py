"""Data-parallel DeepSpeed updates (ZeRO-2, ZeRO-3; 1 and 2 processes on CPU/gloo) equal one plain process.

Each run is `tests/dist_worker.py` in subprocesses (torchrun for two ranks): a tiny fp32 Qwen3 with tied embeddings,
three DSRL steps (the marginal NSR phase, then GRPO with active gradient clipping), token-budget micro-batches with
zero-weight filler micro-batches on the rank that has fewer. Global losses, entropies, gradient norms and the final parameters
must match the single-process PyTorch run to fp32 round-off.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

for _module in ("deepspeed", "transformers"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"the distributed trainer path needs {_module} (the train extra), which is not installed",
                    allow_module_level=True)

import torch  # noqa: E402

from tests.dist_worker import GRAD_CLIP  # noqa: E402
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
WORKER = ROOT / "tests" / "dist_worker.py"
STEPS = 3
TIMEOUT_S = 420
# Same fp32 math in a different summation order (gloo reductions, ZeRO buckets): observed ≤ 1.2e-6 relative.
RTOL = 1e-5
# run name -> (mode, processes, dtype[, algo, epochs])
RUNS = {"torch_1": ("torch", 1, "float32"), "zero2_1": ("zero2", 1, "float32"), "zero2_2": ("zero2", 2, "float32"),
        "zero3_2": ("zero3", 2, "float32"), "torch_1_bf16": ("torch", 1, "bfloat16"),
        "zero2_1_bf16": ("zero2", 1, "bfloat16"),
        # REINFORCE++ whitens over the global batch; two updates per step (the second off-policy, old log-probs
        # recomputed through each rank's DeepSpeed engine)
        "rpp_torch_1": ("torch", 1, "float32", "reinforce_pp", 2),
        "rpp_zero2_2": ("zero2", 2, "float32", "reinforce_pp", 2)}
# bf16 compute: the plain updater and DeepSpeed both update fp32 masters from bf16 gradients; their forward passes
# round alike, but bf16 sums of different order differ by ~2^-8 relative.
BF16_RTOL = 2e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(mode: str, procs: int, dtype: str, out: Path, algo: str = "dsrl", epochs: int = 1) -> list[str]:
    args = [str(WORKER), "--mode", mode, "--steps", str(STEPS), "--dtype", dtype, "--out", str(out), "--algo", algo,
            "--epochs", str(epochs)]
    if procs == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), *args]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every run's JSON result; the runs go concurrently, one thread per process (2 cores fit them all)."""
    tmp = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = {}
    for name, (mode, n, dtype, *algo) in RUNS.items():
        command = _command(mode, n, dtype, tmp / f"{name}.json", *algo)
        log = (tmp / f"{name}.log").open("w")
        procs[name] = (command, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                       log)
    failures = []
    for name, (command, proc, log) in procs.items():
        status: int | str
        try:
            status = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = f"timeout after {TIMEOUT_S} s"
        log.close()
        if status != 0 or not (tmp / f"{name}.json").is_file():
            tail = (tmp / f"{name}.log").read_text()[-4000:]
            failures.append(f"run {name} ({' '.join(command)}) failed (exit {status}):\n{tail}")
    assert not failures, "\n\n".join(failures)
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in RUNS}


def _max_rel(got: list[float], want: list[float]) -> float:
    return max(abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want, strict=True))


def test_reference_covers_both_phases_clipping_and_micro_batches(results: dict[str, dict[str, Any]]) -> None:
    steps = results["torch_1"]["steps"]
    assert [s["algo"] for s in steps] == ["nsr_prerl", "grpo", "grpo"]
    assert all(s["stepped"] and math.isfinite(s["loss"]) and s["loss"] != 0 for s in steps)
    norms = [s["grad_norm"] for s in steps]
    assert min(norms) < GRAD_CLIP < max(norms), f"want clipped and unclipped steps, grad norms {norms}"
    assert all(s["micro_batches"][0] >= 3 for s in steps), [s["micro_batches"] for s in steps]


@pytest.mark.parametrize("name", ["zero2_2", "zero3_2"])
def test_two_ranks_run_equal_micro_batch_counts_with_filler(results: dict[str, dict[str, Any]], name: str) -> None:
    run = results[name]
    assert run["world_size"] == 2
    for s in run["steps"]:
        assert s["micro_batches"][0] == s["micro_batches"][1], s
    assert sum(f for s in run["steps"] for f in s["fillers"]) > 0, "no rank needed filler micro-batches"


@pytest.mark.parametrize("name", ["zero2_1", "zero2_2", "zero3_2"])
def test_deepspeed_matches_single_process(results: dict[str, dict[str, Any]], name: str) -> None:
    want, got = results["torch_1"], results[name]
    assert [s["algo"] for s in got["steps"]] == [s["algo"] for s in want["steps"]]
    assert [s["kept_tokens"] for s in got["steps"]] == [s["kept_tokens"] for s in want["steps"]]
    # On-policy the loss is -mean(A) whatever the weights; entropy and gradient norm depend on the model.
    for key in ("loss", "entropy", "grad_norm"):
        err = _max_rel([s[key] for s in got["steps"]], [s[key] for s in want["steps"]])
        assert err < RTOL, f"{name}: per-step {key} max relative error {err:.2e} (rtol {RTOL:.0e})"
    assert got["param_sumsq"].keys() == want["param_sumsq"].keys()
    names = sorted(want["param_sumsq"])
    err = _max_rel([got["param_sumsq"][n] for n in names], [want["param_sumsq"][n] for n in names])
    worst = max(names, key=lambda n: abs(got["param_sumsq"][n] / want["param_sumsq"][n] - 1))
    assert err < RTOL, f"{name}: final parameter sum of squares max relative error {err:.2e} at {worst}"


def test_deepspeed_bf16_trains_through_fp32_masters_like_the_plain_updater(results: dict[str, dict[str, Any]]) -> None:
    """DeepSpeed's bf16 mode (its own fp32 masters) and the plain updater's masters take the same steps."""
    want, got, fp32 = results["torch_1_bf16"], results["zero2_1_bf16"], results["torch_1"]
    for key in ("loss", "grad_norm"):
        err = _max_rel([s[key] for s in got["steps"]], [s[key] for s in want["steps"]])
        assert err < BF16_RTOL, f"zero2 bf16 vs plain bf16: per-step {key} max relative error {err:.2e}"
    names = sorted(want["param_sumsq"])
    err = _max_rel([got["param_sumsq"][n] for n in names], [want["param_sumsq"][n] for n in names])
    assert err < BF16_RTOL, f"zero2 bf16 vs plain bf16: final parameter sum of squares error {err:.2e}"
    # and both train like fp32: the bf16 runs end near the fp32 run's weights, not at the initial ones
    err = _max_rel([want["param_sumsq"][n] for n in names], [fp32["param_sumsq"][n] for n in names])
    assert err < BF16_RTOL, f"plain bf16 vs fp32: final parameter sum of squares error {err:.2e}"


def test_two_rank_reinforce_pp_equals_one_rank_with_the_same_global_batch(results: dict[str, dict[str, Any]]) -> None:
    """Global whitening: 2 ranks holding 2 prompts each get the 1-process advantages of all 4 prompts, and two
    updates per step (old log-probs, clipped ratios) move the weights alike."""
    from dsrl_fast.rl.advantages import compute_advantages
    from tests.dist_worker import shard, step_samples

    want, got = results["rpp_torch_1"], results["rpp_zero2_2"]
    assert got["world_size"] == 2 and all(s["updates"] == 2 for s in want["steps"] + got["steps"])
    assert any(s["clip_frac"] > 0 for s in want["steps"]), "the second updates should clip some ratios"
    for step, (w, g) in enumerate(zip(want["steps"], got["steps"], strict=True)):
        assert _max_rel(g["advantages"], w["advantages"]) < 1e-6, f"step {step}: advantages differ"
        halves = [shard(step_samples(step), r, 2) for r in range(2)]
        per_rank = [v for h in halves for v in compute_advantages(
            h.rewards, "reinforce_pp", token_counts=torch.tensor([float(len(x)) for x in h.response_ids])).tolist()]
        assert _max_rel(per_rank, w["advantages"]) > 1e-3, "per-rank whitening would differ: the check is not vacuous"
    for key in ("loss", "grad_norm"):
        err = _max_rel([s[key] for s in got["steps"]], [s[key] for s in want["steps"]])
        assert err < RTOL, f"rpp zero2 x2 vs 1 process: per-step {key} max relative error {err:.2e}"
    names = sorted(want["param_sumsq"])
    err = _max_rel([got["param_sumsq"][n] for n in names], [want["param_sumsq"][n] for n in names])
    assert err < RTOL, f"rpp zero2 x2 vs 1 process: final parameter sum of squares max relative error {err:.2e}"
