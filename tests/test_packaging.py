"""The wheel ships kernels/ as dsrl_fast.kernels (never a top-level `kernels`) together with the train presets."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path: Path) -> None:
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".venv", ".venv-*", ".git", "runs", "build", "*.egg-info", "__pycache__", "results")
    shutil.copytree(ROOT, source, ignore=skip)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
           str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("dsrl_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "kernels" not in top_level, f"a top-level kernels/ would shadow Hugging Face's package: {sorted(top_level)}"
    for required in ("dsrl_fast/kernels/__init__.py", "dsrl_fast/kernels/linear_logprobs.py",
                     "dsrl_fast/kernels/varlen_attention.py", "dsrl_fast/ops/linear_logprobs.py",
                     "dsrl_fast/train/trainer.py", "dsrl_fast/rollout/hf_engine.py",
                     "dsrl_fast/train/presets/qwen3_4b_math.yaml"):
        assert required in names, f"{required} missing from the wheel"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dsrl-fast = dsrl_fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_importing_the_package_needs_only_pytorch() -> None:
    """`import dsrl_fast` (the loss API) loads neither Triton nor transformers: they load when a path first runs."""
    code = "import sys, dsrl_fast; print(sorted(m for m in ('triton', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
