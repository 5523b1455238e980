"""Fused log-prob / policy-loss benchmark: our Triton and PyTorch paths against naive PyTorch, Liger and CCE.

    python -m bench.fused_loss --shapes qwen3-4b,qwen3-8b,small --n 8192,32768 --dtype bf16 \
        --impls naive,torch,triton,liger_flce,liger_grpo,cce --passes fwd,bwd,fwdbwd
    python -m bench.fused_loss --quick      # CI smoke: the tiny shape, 1 warm-up, 3 repeats

Every implementation gets the same inputs and returns a scalar loss whose backward produces d_hidden and d_weight.
FLOPs follow the common convention: 2·N·H·V forward, 4·N·H·V backward, 6·N·H·V forward+backward.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.harness import (
    DEFAULT_RESULTS_DIR,
    MIB,
    Roofline,
    Row,
    append_rows,
    device_name,
    gemm_roofline,
    is_out_of_memory,
    markdown_table,
    median_ms,
    peak_memory_delta,
    run_metadata,
)
from dsrl_fast import PolicyLossConfig, policy_loss, token_policy_loss

SEQ_LEN = 256
LOGIT_STD = 4.0
ZIPF_EXPONENT = 1.1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASS_FLOPS = {"fwd": 2, "bwd": 4, "fwdbwd": 6}
CPU_SHAPES = ("tiny", "small")
LOSS_CONFIG = PolicyLossConfig()


@dataclass(frozen=True)
class ShapeFamily:
    """hidden size H, vocabulary V, and a fixed token count N (None: N comes from --n)."""

    h: int
    v: int
    n: int | None


SHAPES = {
    "qwen3-4b": ShapeFamily(h=2560, v=151936, n=None),
    "qwen3-8b": ShapeFamily(h=4096, v=151936, n=None),
    "small": ShapeFamily(h=256, v=4099, n=512),
    "tiny": ShapeFamily(h=64, v=1000 + 7, n=64),
}


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    h: int
    v: int

    @property
    def label(self) -> str:
        return f"{self.name} N={self.n} H={self.h} V={self.v}"

    def as_dict(self, dtype: str) -> dict[str, object]:
        return {"name": self.name, "N": self.n, "H": self.h, "V": self.v, "dtype": dtype}


@dataclass
class Inputs:
    """hidden (N, H) and weight (V, H) at the bench dtype with requires_grad; labels (N,) int64 sampled from the
    model's own softmax; advantages (N,) fp32, ±1 constant over each sequence of `seq_len` tokens."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    advantages: torch.Tensor
    seq_len: int

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


LossFn = Callable[[Inputs], torch.Tensor]


@dataclass(frozen=True)
class Impl:
    """A loss implementation: `build()` returns the loss function; `skip_reason` says why it cannot run (or None).

    probe_on_cpu: on CPU, a failure of the first call means "cannot run here" (skipped), not a bug (error).
    """

    name: str
    build: Callable[[torch.device], LossFn]
    skip_reason: Callable[[Shape, str, torch.device], str | None]
    probe_on_cpu: bool = False


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    """Logits that look like a real LM's: a Zipf unigram prior (exponent ZIPF_EXPONENT over a random ranking of the
    vocabulary, carried by hidden column 0 = 1) plus a context term of std LOGIT_STD; labels sampled from that
    softmax, so label frequencies are Zipf-like and most rows are peaked (flat logits hide peers' work skipping)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(shape.n, shape.h, device=device, generator=gen)
    weight = torch.randn(shape.v, shape.h, device=device, generator=gen) * (LOGIT_STD / shape.h**0.5)
    ranks = torch.randperm(shape.v, device=device, generator=gen).float() + 1.0
    hidden[:, 0] = 1.0
    weight[:, 0] = -ZIPF_EXPONENT * torch.log(ranks)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    labels = torch.empty(shape.n, dtype=torch.int64, device=device)
    rows = max(1, (1 << 26) // shape.v)
    for start in range(0, shape.n, rows):
        probs = torch.softmax((hidden[start:start + rows] @ weight.T).float(), dim=-1)
        labels[start:start + rows] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    seq_len = min(SEQ_LEN, shape.n)
    num_seqs = -(-shape.n // seq_len)
    signs = torch.randint(0, 2, (num_seqs,), device=device, generator=gen).float() * 2 - 1
    advantages = signs.repeat_interleave(seq_len)[: shape.n].contiguous()
    return Inputs(hidden.requires_grad_(), weight.requires_grad_(), labels, advantages, seq_len)


def _naive(device: torch.device) -> LossFn:
    def loss(x: Inputs) -> torch.Tensor:
        logits = (x.hidden @ x.weight.T).float() / LOSS_CONFIG.temperature
        log_p = torch.log_softmax(logits, dim=-1)
        logprobs = log_p.gather(1, x.labels[:, None]).squeeze(1)
        with torch.no_grad():
            entropy = -(log_p.exp() * log_p).sum(-1)
        return token_policy_loss(logprobs, x.advantages, entropy=entropy, config=LOSS_CONFIG)[0]
    return loss


def _trl_chunked(device: torch.device) -> LossFn:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def loss(x: Inputs) -> torch.Tensor:
        logprobs, entropy = ChunkedLogProbFunction.apply(x.hidden, x.weight, None, x.labels, LOSS_CONFIG.temperature,
                                                         _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",))[:2]
        return token_policy_loss(logprobs, x.advantages, entropy=entropy.detach(), config=LOSS_CONFIG)[0]
    return loss


def _verl_lce(device: torch.device) -> LossFn:
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    def loss(x: Inputs) -> torch.Tensor:
        logprobs, entropy = linear_cross_entropy(x.hidden, x.weight, x.labels, float(LOSS_CONFIG.temperature), "none")
        return token_policy_loss(logprobs, x.advantages, entropy=entropy.detach(), config=LOSS_CONFIG)[0]
    return loss


def _cuda_only(name: str) -> Callable[[Shape, str, torch.device], str | None]:
    def reason(shape: Shape, dtype: str, device: torch.device) -> str | None:
        return f"{name} runs on CUDA only" if device.type != "cuda" else None
    return reason


def _ours(impl: str) -> Callable[[torch.device], LossFn]:
    def build(device: torch.device) -> LossFn:
        return lambda x: policy_loss(x.hidden, x.weight, x.labels, x.advantages, config=LOSS_CONFIG, impl=impl).loss
    return build


def _liger_flce(device: torch.device) -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss()
    return lambda x: module(x.weight, x.hidden, x.labels)


def _liger_sm90(device: torch.device) -> LossFn:
    from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction

    def loss(x: Inputs) -> torch.Tensor:
        nll = LigerFusedLinearScaledCrossEntropyFunction.apply(x.hidden, x.weight, x.labels,
                                                               LOSS_CONFIG.temperature)
        return nll.mean()
    return loss


def _hopper_only(shape: Shape, dtype: str, device: torch.device) -> str | None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "Liger's SM90 CuTe kernels run on sm_90 (H100/H200) only"
    return None


def _liger_grpo(device: torch.device) -> LossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # "dapo" normalizes by the token count of the batch, like our token-mean; no reference model, no KL.
    module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                      epsilon_low=LOSS_CONFIG.clip_low, epsilon_high=LOSS_CONFIG.clip_high,
                                      compiled=device.type == "cuda")

    def loss(x: Inputs) -> torch.Tensor:
        b, t = x.hidden.shape[0] // x.seq_len, x.seq_len
        mask = torch.ones(b, t, device=x.hidden.device)
        return module(x.hidden.view(b, t, -1), x.weight, x.labels.view(b, t), mask, x.advantages[::t])[0]
    return loss


def _cce(device: torch.device) -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device.type == "cuda" else "torch_compile"
    return lambda x: linear_cross_entropy(x.hidden, x.weight, x.labels, impl=impl)


def _missing_module(module: str, package: str) -> str | None:
    try:
        __import__(module)
    except ImportError as exc:
        return f"{package} is not importable ({exc})"
    return None


def _common_skip(shape: Shape, dtype: str, device: torch.device) -> str | None:
    if device.type == "cpu" and shape.name not in CPU_SHAPES:
        return f"on CPU only the {'/'.join(CPU_SHAPES)} shapes run"
    return None


def _triton_skip(shape: Shape, dtype: str, device: torch.device) -> str | None:
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels on CPU need TRITON_INTERPRET=1 (the interpreter)"
        if dtype == "bf16":
            return "bf16 is wrong under the Triton interpreter (triton issue 11584); use --dtype fp32/fp16 on CPU"
    return None


def _skip(*checks: Callable[[Shape, str, torch.device], str | None],
          module: tuple[str, str] | None = None) -> Callable[[Shape, str, torch.device], str | None]:
    def reason(shape: Shape, dtype: str, device: torch.device) -> str | None:
        for check in (_common_skip, *checks):
            why = check(shape, dtype, device)
            if why:
                return why
        return _missing_module(*module) if module else None
    return reason


def _grpo_skip(shape: Shape, dtype: str, device: torch.device) -> str | None:
    seq_len = min(SEQ_LEN, shape.n)
    if shape.n % seq_len:
        return f"liger_grpo needs N divisible by the sequence length {seq_len}, got N={shape.n}"
    return None


IMPLS = {
    "naive": Impl("naive", _naive, _skip()),
    "torch": Impl("torch", _ours("torch"), _skip()),
    "triton": Impl("triton", _ours("triton"), _skip(_triton_skip)),
    "grad_in_forward": Impl("grad_in_forward", _ours("grad_in_forward"), _skip(_triton_skip)),
    "liger_flce": Impl("liger_flce", _liger_flce, _skip(_triton_skip, module=("liger_kernel", "liger-kernel"))),
    "liger_sm90": Impl("liger_sm90", _liger_sm90,
                       _skip(_hopper_only, module=("liger_kernel.ops.cutedsl.ops.fused_scaled_cross_entropy_sm90",
                                                   "liger-kernel[cutedsl] (nvidia-cutlass-dsl, apache-tvm-ffi)"))),
    "liger_grpo": Impl("liger_grpo", _liger_grpo, _skip(_grpo_skip, module=("liger_kernel", "liger-kernel"))),
    "cce": Impl("cce", _cce, _skip(module=("cut_cross_entropy", "cut-cross-entropy")),
                probe_on_cpu=True),
    "trl_chunked": Impl("trl_chunked", _trl_chunked, _skip(module=("trl.kernels.chunked_logprob", "trl >= 1.16"))),
    "verl_lce": Impl("verl_lce", _verl_lce,
                     _skip(_cuda_only("verl's linear_cross_entropy (Triton kernels, CUDA streams)"),
                           module=("verl.utils.kernel.linear_cross_entropy", "verl"))),
}
IMPL_NAMES = tuple(IMPLS)


@dataclass(frozen=True)
class Measurement:
    """One (impl, pass): median ms and peak bytes above the inputs (None off CUDA), or a failure label."""

    time_ms: float | None
    peak_bytes: int | None
    failure: str | None = None


def _pass_runner(loss_fn: LossFn, x: Inputs,
                 pass_name: str) -> tuple[Callable[[], object], Callable[[object], object]]:
    """(setup, fn) for one pass; setup clears the gradients (and runs the forward for "bwd")."""
    def clear() -> None:
        x.clear_grads()

    if pass_name == "fwd":
        return clear, lambda _: loss_fn(x)
    if pass_name == "bwd":
        def forward() -> torch.Tensor:
            x.clear_grads()
            return loss_fn(x)
        return forward, lambda loss: loss.backward()
    assert pass_name == "fwdbwd"
    return clear, lambda _: loss_fn(x).backward()


def measure(loss_fn: LossFn, x: Inputs, pass_name: str, *, device: torch.device, warmup: int,
            repeat: int) -> Measurement:
    """Median time of one pass, then its peak memory above the inputs in a separate call."""
    setup, fn = _pass_runner(loss_fn, x, pass_name)
    try:
        ms = median_ms(fn, device=device, warmup=warmup, repeat=repeat, setup=setup)
        peak = peak_memory_delta(fn, device=device, setup=setup)
    finally:
        x.clear_grads()
    return Measurement(ms, peak)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


@dataclass
class Report:
    """What one run collected: JSON rows, skip lines ("impl @ shape: reason") and the count of errored rows."""

    rows: list[Row]
    skipped: list[str]
    errors: int = 0


TABLE_HEADERS = ["impl", "pass", "median ms", "TFLOP/s", "roofline ms", "× roofline", "peak Δ MiB", "% fp32 logits"]


def _roofline(shape: Shape, shape_info: dict[str, object], args: argparse.Namespace, device: torch.device,
              report: Report) -> Roofline | None:
    """The same-run GEMM roofline of `shape` (None when it does not fit in memory); prints the shape header."""
    logits_mib = shape.n * shape.v * 4 / MIB
    header = (f"\n## {shape.label} {args.dtype} on {device_name(device)}: "
              f"fp32 logits avoided N·V·4 = {logits_mib:.1f} MiB; ")
    try:
        roof = gemm_roofline(shape.n, shape.h, shape.v, dtype=DTYPES[args.dtype], device=device,
                             warmup=args.warmup, repeat=args.repeat)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        print(header + "GEMM roofline OOM")
        report.rows.append(Row("gemm_roofline", "torch.mm", shape_info, "time", "OOM", "ms"))
        return None
    finally:
        _release(device)
    print(header + f"GEMM roofline (N×H)@(H×V) {roof.gemm_ms:.3f} ms = {roof.tflops:.1f} TFLOP/s")
    report.rows += [Row("gemm_roofline", "torch.mm", shape_info, "time", roof.gemm_ms, "ms"),
                    Row("gemm_roofline", "torch.mm", shape_info, "tflops", roof.tflops, "TFLOP/s")]
    return roof


def _probe_failure(loss_fn: LossFn, x: Inputs) -> str | None:
    """Run forward+backward once; the exception's first line if it fails."""
    try:
        loss_fn(x).backward()
    except Exception as exc:  # noqa: BLE001 - the reason is reported as a skip line
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        x.clear_grads()
    return None


def _measure_or_fail(loss_fn: LossFn, x: Inputs, pass_name: str, label: str, args: argparse.Namespace,
                     device: torch.device, report: Report) -> Measurement:
    """measure(), with an allocation failure turned into failure="OOM" and any other exception into "error"."""
    try:
        return measure(loss_fn, x, pass_name, device=device, warmup=args.warmup, repeat=args.repeat)
    except Exception as exc:  # noqa: BLE001 - one broken configuration must not stop the sweep
        if is_out_of_memory(exc):
            return Measurement(None, None, "OOM")
        print(f"ERROR {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
        report.errors += 1
        return Measurement(None, None, "error")
    finally:
        _release(device)


def bench_shape(shape: Shape, impls: Sequence[Impl], passes: Sequence[str], args: argparse.Namespace,
                device: torch.device, report: Report) -> None:
    """Roofline, then every runnable impl × pass at `shape`: rows and skips go to `report`, a table to stdout.

    An allocation failure marks that (impl, pass) "OOM"; any other exception marks it "error", is printed to stderr
    and counted in report.errors; either way the sweep goes on.
    """
    runnable = []
    for impl in impls:
        why = impl.skip_reason(shape, args.dtype, device)
        if why:
            report.skipped.append(f"{impl.name} @ {shape.label}: {why}")
        else:
            runnable.append(impl)
    if not runnable:
        return
    shape_info = shape.as_dict(args.dtype)
    roof = _roofline(shape, shape_info, args, device, report)
    logits_bytes = shape.n * shape.v * 4
    x = make_inputs(shape, DTYPES[args.dtype], device, args.seed)
    table = []
    for impl in runnable:
        loss_fn = impl.build(device)
        if impl.probe_on_cpu and device.type == "cpu":
            failure = _probe_failure(loss_fn, x)
            if failure:
                report.skipped.append(f"{impl.name} @ {shape.label}: first call failed here ({failure})")
                continue
        for pass_name in passes:
            op = f"fused_loss.{pass_name}"
            m = _measure_or_fail(loss_fn, x, pass_name, f"{impl.name} {pass_name} @ {shape.label}", args, device,
                                 report)
            if m.failure:
                report.rows.append(Row(op, impl.name, shape_info, "time", m.failure, "ms"))
                table.append([impl.name, pass_name, m.failure] + ["-"] * (len(TABLE_HEADERS) - 3))
                continue
            assert m.time_ms is not None
            flops = PASS_FLOPS[pass_name] * shape.n * shape.h * shape.v
            tflops = flops / (m.time_ms * 1e9)
            roof_ms = roof.time_ms(flops) if roof else None
            report.rows += [Row(op, impl.name, shape_info, "time", m.time_ms, "ms"),
                            Row(op, impl.name, shape_info, "tflops", tflops, "TFLOP/s")]
            if roof_ms is not None:
                report.rows.append(Row(op, impl.name, shape_info, "roofline_time", roof_ms, "ms"))
            if m.peak_bytes is not None:
                report.rows.append(Row(op, impl.name, shape_info, "peak_mem_delta", m.peak_bytes, "bytes"))
            peak = m.peak_bytes
            table.append([impl.name, pass_name, f"{m.time_ms:.3f}", f"{tflops:.2f}", _fmt(roof_ms, ".3f"),
                          _fmt(None if roof_ms is None else m.time_ms / roof_ms, ".2f"),
                          _fmt(None if peak is None else peak / MIB, ".1f"),
                          _fmt(None if peak is None else 100.0 * peak / logits_bytes, ".1f")])
    del x
    _release(device)
    print(markdown_table(TABLE_HEADERS, table))


def _csv(choices: Sequence[str], name: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{name} must be a comma list of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def _token_counts(text: str) -> list[int]:
    try:
        counts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        counts = []
    if not counts or any(c <= 0 or c % SEQ_LEN for c in counts):
        raise argparse.ArgumentTypeError(f"--n must be a comma list of positive multiples of {SEQ_LEN}, got {text!r}")
    return counts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fused_loss", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=_csv(tuple(SHAPES), "--shapes"), default=None,
                   help="comma list of shape names (default qwen3-4b,qwen3-8b,small; tiny with --quick)")
    p.add_argument("--n", type=_token_counts, default=[8192, 32768], help="token counts N for the qwen3 shapes")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--impls", type=_csv(IMPL_NAMES, "--impls"), default=list(IMPL_NAMES))
    p.add_argument("--passes", type=_csv(tuple(PASS_FLOPS), "--passes"), default=list(PASS_FLOPS))
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--repeat", type=int, default=10, help="timed calls; the median is reported")
    p.add_argument("--quick", action="store_true", help="CI smoke: tiny shape (unless --shapes), 1 warm-up, 3 repeats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="where fused_loss.jsonl goes")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeat = 1, 3
    if args.shapes is None:
        args.shapes = ["tiny"] if args.quick else ["qwen3-4b", "qwen3-8b", "small"]
    if args.warmup < 0 or args.repeat < 1:
        p.error(f"--warmup must be >= 0 and --repeat >= 1, got {args.warmup} and {args.repeat}")
    return args


def expand_shapes(names: Sequence[str], counts: Sequence[int]) -> list[Shape]:
    """Shape names × token counts (families with a fixed N ignore the counts)."""
    shapes = []
    for name in names:
        family = SHAPES[name]
        for n in [family.n] if family.n is not None else counts:
            shapes.append(Shape(name, n, family.h, family.v))
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    report = Report(rows=[], skipped=[])
    impls = [IMPLS[name] for name in args.impls]
    for shape in expand_shapes(args.shapes, args.n):
        bench_shape(shape, impls, args.passes, args, device, report)
    if report.skipped:
        print("\nSkipped:")
        for line in report.skipped:
            print(f"- {line}")
    if report.rows:
        path = append_rows(report.rows, name="fused_loss", results_dir=args.results_dir, meta=run_metadata(device))
        print(f"\nWrote {len(report.rows)} rows to {path}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
