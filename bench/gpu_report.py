"""The Markdown report of a bench/gpu_run.py results dict (whatever sections it holds so far)."""

from __future__ import annotations

from typing import Any

from bench.harness import markdown_table

MIB = 1 << 20


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:.0f}"


def _environment(env: dict[str, Any]) -> list[str]:
    keys = ("gpu", "sms", "memory_bytes", "capability", "copy_tb_per_s", "gemm_8192_tflops", "fp32_gemm", "versions",
            "git_sha", "timestamp")
    return ["## Environment", "", *[f"- {k}: {env[k]}" for k in keys if k in env], ""]


def _kernels(section: dict[str, Any]) -> list[str]:
    rows = [[r["shape"], str(r["N"]), r["launch"]["name"], _ms(r["seconds"]), _ms(r.get("predicted_default_s")),
             _ms(r.get("predicted_fitted_s"))] for r in section.get("records", [])]
    return ["## Kernels (one launch each, CUDA events)", "",
            markdown_table(["shape", "N", "launch", "measured ms", "predicted ms (review params)",
                            "predicted ms (fitted)"], rows) if rows else "(none)", "",
            f"Fitted roofline parameters ({section.get('gpu_model', '?')}): {section.get('fitted_params')}", "",
            *[f"- skipped {s}" for s in section.get("skipped", [])], ""]


def _paths(section: dict[str, Any]) -> list[str]:
    rows = []
    for r in section.get("records", []):
        if "impl" not in r:
            rows.append([r["shape"], str(r["N"]), r["inputs"], "kept share", "-", "-", "-", "-", "-",
                         f"{r['kept_share']:.3f}"])
            continue
        rows.append([r["shape"], str(r["N"]), r["inputs"], r["impl"], f"{r['ms']:.2f}",
                     f"{r['predicted_ms']:.2f}" if "predicted_ms" in r else "-", f"{100 * r['share_of_6nhv_rate']:.0f}%",
                     _mib(r.get("output_grad_bytes")), _mib(r.get("workspace_bytes")), "-"])
    return ["## Paths (forward + backward through policy_loss)", "",
            markdown_table(["shape", "N", "inputs", "impl", "ms", "predicted ms (fitted)", "% of 6NHV cuBLAS rate",
                            "output grads MiB", "workspace MiB", "kept tiles"], rows) if rows else "(none)", "",
            *[f"- skipped {s}" for s in section.get("skipped", [])], ""]


def _flat(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [line for k, v in value.items() for line in _flat(f"{prefix}{k}.", v)]
    return [f"- {prefix.rstrip('.')}: {value}"]


def _peers(section: dict[str, Any]) -> list[str]:
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for row in section.get("rows", []):
        if row["op"] == "gemm_roofline":
            continue
        key = (row["impl"], f"{row['shape']['name']} N={row['shape']['N']}")
        cells.setdefault(key, {})[row["metric"]] = row["value"]

    def number(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else str(value if value is not None else "-")

    rows = [[impl, shape, number(m.get("time"), ".2f"), number(m.get("tflops"), ".0f"),
             _mib(m["peak_mem_delta"]) if isinstance(m.get("peak_mem_delta"), (int, float)) else "-"]
            for (impl, shape), m in cells.items()]
    return ["## Peers (forward + backward, same process)", "",
            markdown_table(["impl", "shape", "median ms", "TFLOP/s at 6NHV", "peak Δ MiB"], rows) if rows else "(none)",
            "", *[f"- skipped {s}" for s in section.get("skipped", [])], ""]


def _tests(section: dict[str, Any]) -> list[str]:
    cases = section.get("cases", [])
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    bad = [f"- {c['outcome']}: {c['test']}" for c in cases if c["outcome"] in ("failure", "error")]
    return ["## Device tests", "", f"- return code {section.get('returncode')}, {counts}", *bad, ""]


def _update(section: dict[str, Any]) -> list[str]:
    lines = ["## One update step (the memory plan against the GPU)", ""]
    lines += [f"- {k}: {section[k]}" for k in ("model", "parameters", "plan_max_tokens", "plan_update_peak", "skipped",
                                               "tokens", "tokens_per_s", "forward_backward_s", "step_s")
              if k in section]
    lines += _flat("plan.", section.get("plan_phases", {})) + _flat("measured.", section.get("measured") or {})
    return lines + [""]


def render(results: dict[str, Any]) -> str:
    run = results.get("run", {})
    lines = ["# bench.gpu_run", "", f"dry run: {run.get('dry_run')}; deadline {run.get('deadline_s')} s", "",
             markdown_table(["section", "status", "seconds"],
                            [[k, v["status"], str(v["seconds"])] for k, v in run.get("sections", {}).items()]), ""]
    if "environment" in results:
        lines += _environment(results["environment"])
    if "kernels" in results:
        lines += _kernels(results["kernels"])
    if "paths" in results:
        lines += _paths(results["paths"])
    if "hazards" in results:
        lines += ["## Hazards", "", *_flat("", results["hazards"]), ""]
    if "peers" in results:
        lines += _peers(results["peers"])
    if "tests" in results:
        lines += _tests(results["tests"])
    if "update_step" in results:
        lines += _update(results["update_step"])
    if "sweep" in results:
        rows = [[r["sweep"], r["config"], str(r["shape"]), _ms(r.get("seconds")) if "seconds" in r else r["error"]]
                for r in results["sweep"]["records"]]
        lines += ["## Config sweeps (ms per launch; per column for slices)", "",
                  markdown_table(["sweep", "config", "shape", "ms"], rows) if rows else "(none)", ""]
    return "\n".join(lines) + "\n"
