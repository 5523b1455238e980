"""Predicted times of the fused policy loss on H100 and H200, readable without a GPU; and the fit that calibrates them.

    python -m bench.roofline [--n 8192,16384] [--kept 0.011,0.25,0.5] [--steps] [--json out.json]
    python -m bench.roofline --params fitted.json     # predictions with fitted parameters
    python -m bench.roofline --fit gpu_run.json --gpu h100 [--json fitted.json]   # fit from measured kernels

The model (bench/roofline_model.py) runs each kernel at its own rate: Triton MMA kernels at the Triton rate with
their wave quantisation (⌈programs / 132⌉ per SM) and softmax epilogue (hidden by a second resident program or
not), cuBLAS GEMMs at the cuBLAS rate over their wave fill (split-K where cuBLAS would), streams at 90% of HBM;
H100 SXM (3.35 TB/s) and H200 (4.8 TB/s) separately, both 989 TFLOP/s dense bf16. The launches of each path come
from bench/roofline_paths.py with the kernels' vetted configs (kernels/fused_tiles.py). Printed per GPU, shape,
N and path: forward, backward and total predicted ms, the share of the same-run 6·N·H·V cuBLAS rate, the
workspace in % of the fp32 logits; the no-logits path also with tile skipping at each --kept share (the share of
(row block, tile) pairs computed: 0.011 is what a steep Zipf stand-in keeps at V = 151,936, bench/standin_lm.py),
next to Liger's SM90 backward at its own reported rate; and a sweep of the backward slice width. Everything
printed is a prediction until bench/gpu_run.py has measured the kernels and `--fit` has calibrated the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.harness import markdown_table
from bench.roofline_model import GPUS, Launch, Measured, Params, fit
from bench.roofline_paths import SHAPES, PathModel, grad_in_forward, liger_backward_seconds, no_logits
from dsrl_fast.kernels import fused_tiles

DEFAULT_KEPT = (0.011, 0.25, 0.5)
SWEEP_WIDTHS = (896, 1280, 1664, 2048, 2944)


def build(ns: Sequence[int], kept: Sequence[float]) -> list[PathModel]:
    models = []
    for shape in SHAPES:
        for n in ns:
            models += [no_logits(shape, n), grad_in_forward(shape, n)]
            models += [no_logits(shape, n, kept_share=k) for k in kept]
    return models


def _label(m: PathModel) -> str:
    return m.path + ("" if m.kept_share is None else f", tile skip (kept {m.kept_share:g})")


def summary_rows(models: Sequence[PathModel], params: dict[str, Params]) -> list[list[str]]:
    rows = []
    for gpu_key, gpu in GPUS.items():
        p = params[gpu_key]
        for m in models:
            fwd, bwd = m.times(gpu, p)
            liger = liger_backward_seconds(m.n, m.h, m.v)
            rows.append([gpu.name, m.shape, str(m.n), _label(m), f"{fwd * 1e3:.1f}", f"{bwd * 1e3:.1f}",
                         f"{(fwd + bwd) * 1e3:.1f}", f"{100 * m.share(gpu, p):.0f}%", f"{100 * m.logits_share:.1f}%",
                         f"{liger * 1e3:.1f}" if m.path == "no-logits" else "-"])
    return rows


def step_rows(models: Sequence[PathModel], params: dict[str, Params]) -> list[list[str]]:
    rows = []
    for gpu_key, gpu in GPUS.items():
        for m in models:
            for phase, launches in (("fwd", m.forward), ("bwd", m.backward)):
                for launch in launches:
                    rows.append([gpu.name, m.shape, str(m.n), _label(m), phase, launch.name, str(launch.count),
                                 f"{launch.flops * launch.count / 1e12:.2f}",
                                 f"{launch.hbm_bytes * launch.count / 1e9:.2f}",
                                 f"{launch.seconds(gpu, params[gpu_key]) * 1e3:.2f}"])
    return rows


def slice_rows(ns: Sequence[int], params: dict[str, Params]) -> list[list[str]]:
    rows = []
    for gpu_key, gpu in GPUS.items():
        for shape, (h, v) in SHAPES.items():
            chosen = fused_tiles.slice_width(v, 2, h)
            for n in ns:
                for width in sorted({*SWEEP_WIDTHS, chosen}):
                    m = no_logits(shape, n, width=width)
                    extra = (n * width * 2 + n * h * 4) / (n * v * 4)
                    rows.append([gpu.name, shape, str(n), str(width) + (" (chosen)" if width == chosen else ""),
                                 f"{m.times(gpu, params[gpu_key])[1] * 1e3:.2f}", f"{100 * extra:.2f}%"])
    return rows


def load_params(path: Path | None) -> dict[str, Params]:
    """Per-GPU parameters: defaults, or a JSON {"h100": {...}, "h200": {...}} written by --fit (missing GPUs keep the
    defaults)."""
    params = {key: Params() for key in GPUS}
    if path is not None:
        for key, values in json.loads(path.read_text()).get("params", {}).items():
            if key in params:
                params[key] = Params(**values)
    return params


def measured_launches(path: Path) -> list[Measured]:
    """The per-kernel measurements of a bench/gpu_run.py JSON: {"kernels": [{"launch": {...}, "seconds": s}]}."""
    data = json.loads(path.read_text())
    return [Measured(Launch(**row["launch"]), float(row["seconds"])) for row in data.get("kernels", [])
            if row.get("seconds") is not None]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.splitlines()[0])
    p.add_argument("--n", default="8192,16384", help="comma list of token counts")
    p.add_argument("--kept", default=",".join(map(str, DEFAULT_KEPT)),
                   help="comma list of kept shares of (row block, tile) pairs for the tile-skipping rows ('' none)")
    p.add_argument("--params", type=Path, default=None, help="JSON of fitted parameters (as --fit writes)")
    p.add_argument("--fit", type=Path, default=None, help="a bench/gpu_run.py JSON: fit the parameters to it")
    p.add_argument("--gpu", choices=tuple(GPUS), default="h100", help="the GPU the --fit measurements ran on")
    p.add_argument("--json", type=Path, default=None, help="write the predictions (or the fitted parameters) here")
    p.add_argument("--steps", action="store_true", help="also print every launch of every path")
    args = p.parse_args(argv)
    try:
        ns = [int(x) for x in args.n.split(",") if x.strip()]
        kept = [float(x) for x in args.kept.split(",") if x.strip()]
    except ValueError:
        p.error(f"--n must be positive ints and --kept shares in (0, 1], got {args.n!r} and {args.kept!r}")
    if not ns or any(x <= 0 for x in ns) or any(not 0 < k <= 1 for k in kept):
        p.error(f"--n must be positive ints and --kept shares in (0, 1], got {args.n!r} and {args.kept!r}")
    if args.fit is not None:
        if not args.fit.is_file():
            p.error(f"--fit must name a bench/gpu_run.py JSON file, got {str(args.fit)!r} (not a file)")
        fitted = fit(measured_launches(args.fit), GPUS[args.gpu])
        print(json.dumps({args.gpu: dataclasses.asdict(fitted)}, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"params": {args.gpu: dataclasses.asdict(fitted)}}, indent=2) + "\n")
        return 0
    if args.params is not None and not args.params.is_file():
        p.error(f"--params must name a JSON file, got {str(args.params)!r} (not a file)")
    params = load_params(args.params)
    models = build(ns, kept)
    for key, gpu in GPUS.items():
        print(f"{gpu.name}: {json.dumps(dataclasses.asdict(params[key]))}")
    print("\n## Predicted fused policy loss, bf16 (predictions, not measurements)\n")
    print(markdown_table(["GPU", "shape", "N", "path", "fwd ms", "bwd ms", "total ms", "% of 6NHV cuBLAS rate",
                          "workspace % fp32 logits", "Liger SM90 bwd ms"], summary_rows(models, params)))
    print("\n## Backward slice width of the no-logits path (dense backward, predicted)\n")
    print(markdown_table(["GPU", "shape", "N", "slice width", "bwd ms", "dz + fp32 d_hidden % logits"],
                         slice_rows(ns, params)))
    if args.steps:
        print("\n## Launches\n")
        print(markdown_table(["GPU", "shape", "N", "path", "phase", "launch", "count", "TFLOP", "HBM GB", "ms"],
                             step_rows(models, params)))
    if args.json:
        payload = []
        for key, gpu in GPUS.items():
            for m in models:
                fwd, bwd = m.times(gpu, params[key])
                payload.append({"gpu": key, "path": m.path, "kept_share": m.kept_share, "shape": m.shape, "N": m.n,
                                "H": m.h, "V": m.v, "forward_s": fwd, "backward_s": bwd,
                                "share_of_6nhv_rate": m.share(gpu, params[key]),
                                "workspace_share_of_fp32_logits": m.logits_share})
        args.json.write_text(json.dumps({"params": {k: dataclasses.asdict(v) for k, v in params.items()},
                                         "models": payload}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
