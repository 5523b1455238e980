"""Each examples/ script runs to completion against the installed peer (skipped, with the reason, without it).

The scripts run in this interpreter (runpy, as `python examples/<script>` would run them, with sys.argv set), so
they share the peers' imports with the other integration tests instead of paying for a fresh interpreter each.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
EXAMPLES = {
    "trl_dsrl.py": ("trl", ["--steps", "2", "--switch-step", "1"], ["step 1: marginal=1", "step 2: marginal=0"]),
    "verl_policy_loss.py": ("verl", [], ["nsr_prerl: loss=", "marginal row 0: [151644,"]),
    "openrlhf_policy_loss.py": ("openrlhf", [], ["all: loss=", "negative: loss=", "positive: loss="]),
}


@pytest.mark.parametrize("script", list(EXAMPLES))
def test_example_runs(script: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    peer, args, expected = EXAMPLES[script]
    if importlib.util.find_spec(peer) is None:
        pytest.skip(f"{script} needs {peer} at its own pins (pip install 'dsrl_fast[{peer}]'); make test runs it in "
                    f"that peer's environment")
    if script == "trl_dsrl.py":
        args = args + ["--output-dir", str(tmp_path)]
    path = ROOT / "examples" / script
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    for line in expected:
        assert line in out, out[-2000:]
