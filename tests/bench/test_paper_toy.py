"""`python -m bench.paper_toy` as a user types it, with its tiniest options: the outputs' structure, resuming, and
the refusal to mix results of other options. The numbers of so short a run mean nothing; only their form is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from tests.paths import REPO_ROOT

TINY = ["--jobs", "1", "--seeds", "2", "--steps", "2", "--switch-steps", "0,1", "--dsrl-switch", "1", "--sft-steps", "2",
        "--sft-batch", "16", "--train-size", "32", "--eval-size", "3", "--eval-n", "4", "--prompts", "2",
        "--rollouts", "2", "--max-response-len", "24", "--algos", "grpo,dsrl,nsr_prerl,psr_prerl"]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bench.paper_toy", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=600)


def test_tiny_run_writes_table_verdicts_plots_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "paper_toy"
    proc = _bench("--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [f"{a}-seed{s}" for a in ("grpo", "dsrl", "nsr_prerl", "psr_prerl") for s in (0, 1)]
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(names + ["base"])
    assert proc.stderr.count("] ") >= len(names) and f"[{len(names)}/{len(names)}]" in proc.stderr
    run = json.loads((out / "runs" / "dsrl-seed1.json").read_text())
    assert list(run["pass_at_k"]) == ["1", "2", "3", "4"] and len(run["correct"]) == 3
    assert all(0 <= c <= 4 for c in run["correct"]) and run["avg"] == sum(run["correct"]) / 12
    assert len(run["curves"]["reward_mean"]) == 2 and len(run["curves"]["reflection_share"]) == 2
    assert not (out / "work" / "dsrl-seed1").exists()  # checkpoints are dropped once evaluated
    for plot in ("reward_curves.png", "pass_at_k.png", "thought_shares.png", "switch_sweep.png"):
        assert (out / plot).stat().st_size > 1000, plot
    text = (out / "results.md").read_text()
    assert "| GRPO | 2 |" in text and "| PSR-PreRL | 2 |" in text and "| warm-up (base) | - |" in text
    assert "95% Student t interval over seeds" in text and "Machine: nproc" in text
    assert "Command: `python -m bench.paper_toy --out" in text
    for claim in ("PSR-PreRL collapses", "NSR-PreRL keeps or raises Pass@k", "DSRL ≥ GRPO",
                  "The switch step's inverted U"):
        assert f"**{claim}" in text, claim
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["algorithms"]) == {"grpo", "dsrl", "nsr_prerl", "psr_prerl"}
    assert set(summary["switch_sweep"]) == {"0", "1"}

    # Resuming: nothing is redone; a run whose result is gone is made again.
    (out / "runs" / "grpo-seed1.json").unlink()
    again = _bench("--out", str(out), *TINY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(names)} runs, {len(names) - 1} already done" in again.stderr
    assert "warm-up:" not in again.stderr and (out / "runs" / "grpo-seed1.json").is_file()
    invocations = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert len(invocations) == 2 and all(i["seconds"] > 0 for i in invocations)
    assert "over 2 invocation(s)" in (out / "results.md").read_text()

    # Other defining options: refused with one line and status 2 before any work.
    other = _bench("--out", str(out), *TINY[:-2], "--algos", "grpo", "--lr", "2e-4")
    assert other.returncode == 2 and "--lr 0.0001 -> 0.0002" in other.stderr, other.stderr


def test_bad_options_exit_2_with_one_line(tmp_path: Path) -> None:
    proc = _bench("--out", str(tmp_path), "--steps", "30")
    assert proc.returncode == 2 and "--steps must exceed every switch step (largest 40), got 30" in proc.stderr
    proc = _bench("--out", str(tmp_path), "--algos", "ppo")
    assert proc.returncode == 2 and "--algos must name algorithms from" in proc.stderr
    assert not any(tmp_path.iterdir())
