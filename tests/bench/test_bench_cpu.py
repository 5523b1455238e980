"""CPU smoke run of the fused-loss benchmark (tiny shape, Triton under the interpreter) in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.paths import REPO_ROOT

ROW_FIELDS = {"op", "impl", "shape", "metric", "value", "unit", "gpu", "versions", "git_sha", "timestamp", "command"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "bench.fused_loss", "--device", "cpu", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def test_quick_run_prints_rows_skips_and_writes_json(tmp_path: Path) -> None:
    impls = ["naive", "torch", "triton", "liger_grpo", "cce"]
    proc = _run("--quick", "--dtype", "fp32", "--shapes", "tiny,qwen3-4b", "--n", "8192",
                "--impls", ",".join(impls), "--results-dir", str(tmp_path))
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    assert "GEMM roofline" in out and "fp32 logits avoided" in out
    measured = {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")} - {"impl"}
    skipped_cce = "cce @ tiny" in out
    assert measured | ({"cce"} if skipped_cce else set()) == set(impls), out
    assert "Skipped:" in out
    for impl in impls:
        assert f"{impl} @ qwen3-4b N=8192 H=2560 V=151936: on CPU only the tiny/small shapes run" in out

    rows = [json.loads(line) for line in (tmp_path / "fused_loss.jsonl").read_text().splitlines()]
    assert rows and all(ROW_FIELDS <= set(r) for r in rows)
    assert {r["shape"]["name"] for r in rows} == {"tiny"}
    times = {(r["impl"], r["op"]): r["value"] for r in rows if r["metric"] == "time"}
    for impl in measured:
        for pass_name in ("fwd", "bwd", "fwdbwd"):
            value = times[(impl, f"fused_loss.{pass_name}")]
            assert isinstance(value, float) and value > 0, (impl, pass_name, value)
    assert all(r["gpu"] == "cpu" and r["versions"]["torch"] for r in rows)


def test_bf16_triton_on_interpreter_is_skipped_with_reason(tmp_path: Path) -> None:
    proc = _run("--quick", "--dtype", "bf16", "--impls", "triton", "--results-dir", str(tmp_path))
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "triton @ tiny N=64 H=64 V=1007: bf16 is wrong under the Triton interpreter" in proc.stdout
    assert not (tmp_path / "fused_loss.jsonl").exists()


def test_oom_and_errors_mark_their_rows_and_the_sweep_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from bench import fused_loss

    def exhausted(device: torch.device) -> fused_loss.LossFn:
        def loss(x: fused_loss.Inputs) -> torch.Tensor:
            raise torch.OutOfMemoryError("simulated allocation failure")
        return loss

    def broken(device: torch.device) -> fused_loss.LossFn:
        def loss(x: fused_loss.Inputs) -> torch.Tensor:
            raise RuntimeError("simulated bug")
        return loss

    no_skip = fused_loss.IMPLS["naive"].skip_reason
    impls = [fused_loss.Impl("exhausted", exhausted, no_skip), fused_loss.Impl("broken", broken, no_skip),
             fused_loss.IMPLS["naive"]]
    args = fused_loss.parse_args(["--quick", "--device", "cpu", "--dtype", "fp32", "--passes", "fwd,fwdbwd"])
    report = fused_loss.Report(rows=[], skipped=[])
    shape = fused_loss.expand_shapes(["tiny"], [])[0]
    fused_loss.bench_shape(shape, impls, args.passes, args, torch.device("cpu"), report)

    times = {(r.impl, r.op): r.value for r in report.rows if r.metric == "time"}
    assert times[("exhausted", "fused_loss.fwd")] == "OOM" and times[("exhausted", "fused_loss.fwdbwd")] == "OOM"
    assert isinstance(times[("naive", "fused_loss.fwdbwd")], float)
    assert times[("broken", "fused_loss.fwd")] == "error" and report.errors == 2
    captured = capsys.readouterr()
    assert "| exhausted | fwd    | OOM" in captured.out
    assert "ERROR broken fwd @ tiny N=64 H=64 V=1007: RuntimeError: simulated bug" in captured.err


def test_gpu_run_dry_run_writes_every_section(tmp_path: Path) -> None:
    """bench.gpu_run --dry-run: every section runs on CPU (tiny shapes, interpreter) and leaves results.json,
    results.md and run.log, three flat files (what a device call can bring back)."""
    out = tmp_path / "run"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_run", str(out), "--dry-run"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "run.log"]
    results = json.loads((out / "results.json").read_text())
    sections = results["run"]["sections"]
    assert list(sections) == ["environment", "kernels", "paths", "hazards", "peers", "tests", "update_step", "sweep"]
    assert all(v["status"] == "ok" for v in sections.values()), sections
    assert results["environment"]["git_sha"] and results["environment"]["versions"]["torch"]
    launches = {r["launch"]["name"] for r in results["kernels"]["records"]}
    assert {"forward kernel", "sparse d_hidden", "sparse d_weight", "row gradient kernel (dz over the logits)",
            "cuBLAS d_weight += dzᵀ·h"} <= launches
    assert all(r["seconds"] > 0 for r in results["kernels"]["records"])
    assert set(results["kernels"]["fitted_params"]) >= {"triton_mma_efficiency", "epilogue_cycles"}
    assert {(r["inputs"], r["impl"]) for r in results["paths"]["records"]} == {
        (i, m) for i in ("random", "peaked stand-in") for m in ("triton", "grad_in_forward")}
    hazards = results["hazards"]
    assert hazards["in_place_mismatches"] == {"float16": 0}
    assert hazards["triton_bitwise_differing_repeats"] == 0 and hazards["grad_in_forward_bitwise_differing_repeats"] == 0
    assert hazards["triton_masked_half"]["masked_rows_all_zero"]
    peers = {r["impl"] for r in results["peers"]["rows"]}
    assert {"triton", "grad_in_forward", "trl_chunked"} <= peers
    assert any(s.startswith("liger_sm90 @") and "sm_90" in s for s in results["peers"]["skipped"])
    assert results["tests"]["returncode"] == 0 and results["tests"]["cases"]
    assert all(c["outcome"] in ("passed", "skipped") for c in results["tests"]["cases"])
    assert results["update_step"]["tokens"] > 0 and results["update_step"]["plan_max_tokens"]
    assert {r["sweep"] for r in results["sweep"]["records"]} == {"forward", "slice", "rows"}
    assert all("seconds" in r for r in results["sweep"]["records"])
    report = (out / "results.md").read_text()
    assert "## Kernels" in report and "## Paths" in report and "## One update step" in report


def test_gpu_run_keeps_its_deadline(tmp_path: Path) -> None:
    """A deadline that runs out: the sections after it are recorded as skipped with the reason, and the files are
    still written."""
    out = tmp_path / "run"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_run", str(out), "--dry-run", "--deadline", "0.5",
                           "--sections", "environment,hazards,update_step"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    sections = json.loads((out / "results.json").read_text())["run"]["sections"]
    assert sections["environment"]["status"] == "ok"
    assert sections["update_step"]["status"].startswith("skipped: 0 s left of the deadline")
    assert "update_step" in (out / "results.md").read_text()


def test_gpu_run_refuses_without_cuda_or_interpreter(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_run", str(tmp_path), "--dry-run"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "set TRITON_INTERPRET=1" in proc.stderr


def test_the_update_step_section_plans_a_named_model() -> None:
    """bench.gpu_run's update step plans Qwen3-4B from the shipped dimensions: a valid run config (a named model
    needs a data path; the plan never reads it), with the weights and a micro-batch in its phases."""
    from bench.real_step import _phase_bytes, _plan

    plan = _plan("Qwen/Qwen3-4B", 80 * 2**30)
    phases = _phase_bytes(plan)
    assert plan.model == "Qwen/Qwen3-4B" and phases["always"] > 8e9 and phases["micro-batch"] > 0, phases
