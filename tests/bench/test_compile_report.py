"""The sm_90a compile report: every kernel compiles for Hopper without a GPU, without spills, on wgmma for 16-bit.

The report runs in a subprocess without TRITON_INTERPRET (this test process may have it set: the interpreter's
@triton.jit returns functions that cannot be compiled).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from bench.compile_report import KERNEL_MODULES, MAX_SHARED_BYTES
from tests.paths import REPO_ROOT



@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("compile_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.compile_report", "--json", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"compile report failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "sm_90a" in proc.stdout and "| _forward_kernel" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


def _label(entry: dict[str, Any]) -> str:
    return f"{entry['kernel']} {entry['variant']} {entry['dtype']} {entry['config']}"


def test_every_kernel_compiled(report: list[dict[str, Any]]) -> None:
    failed = [f"{_label(e)}: {e['error']}" for e in report if e["error"]]
    assert not failed, "\n".join(failed)
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        assert len([e for e in report if e["module"] == name]) == len(module.compile_specs())
        kernels = {attr for attr, obj in vars(module).items()
                   if attr.endswith("_kernel") and isinstance(obj, (JITFunction, InterpretedFunction))}
        reported = {e["kernel"] for e in report if e["module"] == name}
        assert kernels and kernels == reported, f"{name}: kernels {sorted(kernels)}, reported {sorted(reported)}"
        assert {e["dtype"] for e in report if e["module"] == name} == {"bf16", "fp16", "fp32"}


def test_default_configs_do_not_spill(report: list[dict[str, Any]]) -> None:
    spilling = [f"{_label(e)}: {e['spill_store_bytes']} B spill stores, {e['spill_load_bytes']} B spill loads, "
                f"{e['stack_bytes']} B stack, {e['registers']} registers" for e in report if e["spill_bytes"]]
    assert not spilling, "default configs spill on sm_90a:\n" + "\n".join(spilling)


def test_16bit_gemm_loops_use_wgmma(report: list[dict[str, Any]]) -> None:
    missing = [_label(e) for e in report if e["expect_wgmma"] and not e["wgmma_count"]]
    assert not missing, "no wgmma in:\n" + "\n".join(missing)
    bf16_gemms = {e["kernel"] for e in report if e["dtype"] == "bf16" and e["wgmma_count"]}
    assert {"_forward_kernel", "_dlogits_kernel", "_sparse_dhidden_kernel", "_sparse_dweight_kernel"} <= bf16_gemms


def test_claimed_residency_fits_the_compile(report: list[dict[str, Any]]) -> None:
    """A config's resident_per_sm sizes the forward's waves (kernels/fused_tiles.py): the sm_90a compile must hold
    that many programs per SM by registers and shared memory. The bf16 forward claims 2 (128 registers, capped)."""
    claims = [e for e in report if e["resident_claimed"] is not None]
    assert claims
    short = [f"{_label(e)}: claims {e['resident_claimed']}, holds {e['programs_per_sm']}" for e in claims
             if e["programs_per_sm"] < e["resident_claimed"]]
    assert not short, "\n".join(short)
    forward = [e for e in claims if e["kernel"] == "_forward_kernel" and e["dtype"] == "bf16"]
    assert forward and forward[0]["resident_claimed"] == 2 and forward[0]["registers"] <= 128


FUSED_LOSS_MODULES = ("dsrl_fast.kernels.linear_logprobs", "dsrl_fast.kernels.sparse_grads",
                      "dsrl_fast.kernels.logits_rows")


def test_fused_loss_kernels_have_no_global_float_atomics(report: list[dict[str, Any]]) -> None:
    """Both fused-loss paths reduce inside GEMM K loops or in grid order: no `red.global`/`atom.global` on floats."""
    entries = [e for e in report if e["module"] in FUSED_LOSS_MODULES]
    assert {e["module"] for e in entries} == set(FUSED_LOSS_MODULES)
    atomic = [f"{_label(e)}: {e['float_atomic_count']}" for e in entries if e["float_atomic_count"] != 0]
    assert not atomic, "global float atomics in:\n" + "\n".join(atomic)


def test_in_place_row_gradient_waits_for_every_warp(report: list[dict[str, Any]]) -> None:
    """16-bit dz written over the fp32 logits it is computed from: the PTX holds the CTA barrier that orders every
    warp's reads before the overlapping stores (kernels/logits_rows.py); the other variants need none and have none."""
    entries = [e for e in report if e["kernel"] == "_row_grad_kernel"]
    in_place = [e for e in entries if e["variant"].endswith("in-place")]
    assert {e["dtype"] for e in in_place} == {"bf16", "fp16"} and len(in_place) == 4
    assert all(e["barrier_count"] >= 1 for e in in_place), [(_label(e), e["barrier_count"]) for e in in_place]
    assert all(e["barrier_count"] == 0 for e in entries if e not in in_place)


def test_barrier_pattern_matches_both_spellings() -> None:
    from bench.compile_report import barrier_count

    ptx = "\tbar.sync \t0;\n@%p3 barrier.sync.aligned 0, 256;\n\t// bar.sync in a comment\n\tmembar.gl;\n"
    assert barrier_count(ptx) == 2


ATOMIC_CANARY = """
import triton
import triton.language as tl


@triton.jit
def _canary_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(out_ptr + offs, tl.load(x_ptr + offs), sem="relaxed")


def compile_specs():
    return [{"kernel": _canary_kernel, "variant": "-", "dtype": "fp32", "signature": {"x_ptr": "*fp32",
             "out_ptr": "*fp32"}, "constexprs": {"BLOCK": 128}, "aligned": (), "num_warps": 4, "num_stages": 1,
             "expect_wgmma": False}]
"""


def test_atomic_detector_sees_triton_atomic_add(tmp_path: Path) -> None:
    """The PTX pattern behind the no-atomics check does match what tl.atomic_add on fp32 compiles to."""
    (tmp_path / "atomic_canary.py").write_text(ATOMIC_CANARY)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    code = ("from bench.compile_report import compile_spec, load_specs; "
            "r = compile_spec(load_specs('atomic_canary')[0], 'atomic_canary'); print(r.error or r.float_atomic_count)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) > 0, proc.stdout


def test_shared_memory_fits_hopper(report: list[dict[str, Any]]) -> None:
    over = [f"{_label(e)}: {e['shared_bytes']} B" for e in report if e["shared_bytes"] > MAX_SHARED_BYTES]
    assert not over, f"shared memory above the sm_90 limit of {MAX_SHARED_BYTES} B:\n" + "\n".join(over)
