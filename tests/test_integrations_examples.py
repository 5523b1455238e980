"""Each examples/ script runs to completion against the installed peer (skipped, with the reason, without it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "trl_dsrl.py": ("trl", ["--steps", "3", "--switch-step", "1"], "step 3: marginal=0"),
    "verl_policy_loss.py": ("verl", [], "nsr_prerl: loss="),
    "openrlhf_policy_loss.py": ("openrlhf", [], "negative: loss="),
}


@pytest.mark.parametrize("script", list(EXAMPLES))
def test_example_runs(script: str, tmp_path: Path) -> None:
    peer, args, expected = EXAMPLES[script]
    if importlib.util.find_spec(peer) is None:
        pytest.skip(f"{script} needs {peer} (pip install 'dsrl_fast[integrations]')")
    if script == "trl_dsrl.py":
        args = args + ["--output-dir", str(tmp_path)]
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in out.stdout, out.stdout[-2000:]
