"""Training-step benchmark: a Qwen3-4B-shaped policy on long responses, fused loss + packed layout vs materialized
logits + padded batches.

    python -m bench.train_step                                   # Qwen3-4B shape, 8192-token responses, bf16
    python -m bench.train_step --layers 8 --response-len 16384   # shallower model, longer responses
    python -m bench.train_step --quick --device cpu              # CPU smoke: a tiny Qwen3, short responses

One step is the forward and backward of the clipped policy loss over `--seqs` responses (lengths spread evenly over
[response_len/2, response_len]) after `--prompt-len`-token prompts, in micro-batches of the same token capacity:

- `fused_packed`: sequences packed end to end (`dsrl_fast.build_micro_batches`), the trunk on the packed row with
  varlen attention (`dsrl_fast.model.packed.packed_hidden_states`), final hidden states of response tokens only, then
  `dsrl_fast.loss.policy_loss` (no logits stored).
- `materialized_padded`: `--padded-micro-batch` sequences right-padded to the longest, the plain Hugging Face forward
  with an attention mask and `logits_to_keep` covering the response region (as verl slices it), `logits.float()`,
  `log_softmax`, `gather`, then the same `token_policy_loss`.

Weights are random (a `Qwen3Config`, nothing downloaded). Gradient checkpointing is on by default for both (a 4B
model's activations at these lengths do not fit without it); the optimizer step is left out (it is the same for
both). Then, per implementation, the largest response length that fits in memory: doubling from `--search-start`
(capped at `--search-cap`), then bisection down to `--search-granularity` tokens, an allocation failure meaning
"does not fit".
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.harness import (
    DEFAULT_RESULTS_DIR,
    MIB,
    Row,
    append_rows,
    device_name,
    is_out_of_memory,
    markdown_table,
    median_ms,
    peak_memory_delta,
    run_metadata,
)
from dsrl_fast import PolicyLossConfig, build_micro_batches, policy_loss, token_policy_loss
from dsrl_fast.model.packed import lm_head_weight, packed_hidden_states, prepare_packed_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPL_NAMES = ("fused_packed", "materialized_padded")
TABLE_HEADERS = ["impl", "median ms", "tokens/s", "peak Δ MiB", "loss", "grad norm", "max response len"]


@dataclass(frozen=True)
class ModelShape:
    """Qwen3 dimensions (tied embeddings, as in Qwen3-4B)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


MODEL_SHAPES = {
    "qwen3-4b": ModelShape(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728,
                           vocab=151936),
    "tiny": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000 + 7),
}


@dataclass(frozen=True)
class StepInputs:
    """The responses of one step: token ids per sample (prompts all `prompt_len` long) and one advantage each."""

    prompts: list[list[int]]
    responses: list[list[int]]
    advantages: list[float]

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens of the step: prompts + responses."""
        return sum(len(p) + len(r) for p, r in zip(self.prompts, self.responses))

    @property
    def response_tokens(self) -> int:
        return sum(len(r) for r in self.responses)


def response_lengths(seqs: int, response_len: int) -> list[int]:
    """`seqs` lengths spread evenly over [response_len/2, response_len] (the longest is response_len)."""
    if seqs == 1:
        return [response_len]
    return [max(1, round(response_len * (0.5 + 0.5 * i / (seqs - 1)))) for i in range(seqs)]


def make_step_inputs(seqs: int, prompt_len: int, response_len: int, vocab: int, seed: int) -> StepInputs:
    """Random token ids; advantages alternate +1 / -1 so every response carries gradient."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(seqs)]
    responses = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in response_lengths(seqs, response_len)]
    return StepInputs(prompts, responses, [1.0 if i % 2 == 0 else -1.0 for i in range(seqs)])


def build_model(shape: ModelShape, *, dtype: torch.dtype, device: torch.device, gradient_checkpointing: bool,
                seed: int) -> PreTrainedModel:
    """A randomly initialized Qwen3ForCausalLM of `shape` on `device` in training mode."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         intermediate_size=shape.intermediate, vocab_size=shape.vocab, tie_word_embeddings=True,
                         max_position_embeddings=131072)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


StepFn = Callable[[], float]


def fused_packed_step(model: PreTrainedModel, x: StepInputs, *, capacity: int, device: torch.device,
                      attention_backend: str, config: PolicyLossConfig) -> StepFn:
    """Forward+backward of the fused loss over packed micro-batches of at most `capacity` tokens; returns the loss."""
    prepare_packed_model(model, attention_backend=attention_backend)
    batches = []
    for idx, batch in build_micro_batches(x.prompts, x.responses, "cond", capacity):
        batch = batch.to(device)
        advantages = torch.tensor([x.advantages[idx[s]] for s in batch.seq_sample_host]).repeat_interleave(
            torch.tensor(batch.seq_response_lens)).to(device)
        labels = batch.labels.index_select(0, batch.masked_idx)
        seq_ids = batch.seq_ids.index_select(0, batch.masked_idx)
        batches.append((batch, labels, seq_ids, advantages))

    def step() -> float:
        total = torch.zeros((), device=device)
        for batch, labels, seq_ids, advantages in batches:
            hidden = packed_hidden_states(model, batch)
            out = policy_loss(hidden, lm_head_weight(model), labels, advantages, seq_ids=seq_ids, config=config)
            out.loss.backward()
            total += out.loss.detach()
        return float(total)

    return step


def materialized_padded_step(model: PreTrainedModel, x: StepInputs, *, micro_batch: int, device: torch.device,
                             config: PolicyLossConfig, temperature: float = 1.0) -> StepFn:
    """Forward+backward over right-padded micro-batches of `micro_batch` sequences with full response logits."""
    model.set_attn_implementation("sdpa")
    prompt_len = len(x.prompts[0])
    assert all(len(p) == prompt_len for p in x.prompts), "the response region is one slice only for equal prompts"
    batches = []
    for start in range(0, len(x.prompts), micro_batch):
        rows = range(start, min(start + micro_batch, len(x.prompts)))
        width = prompt_len + max(len(x.responses[i]) for i in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.int64)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.int64)
        advantages = torch.zeros(len(rows), width - prompt_len)
        for r, i in enumerate(rows):
            seq = x.prompts[i] + x.responses[i]
            input_ids[r, :len(seq)] = torch.tensor(seq)
            attention_mask[r, :len(seq)] = 1
            advantages[r, :len(x.responses[i])] = x.advantages[i]
        response_mask = attention_mask[:, prompt_len:].bool()
        batches.append(tuple(t.to(device) for t in (input_ids, attention_mask, response_mask,
                                                      advantages[response_mask])))

    def step() -> float:
        total = torch.zeros((), device=device)
        for input_ids, attention_mask, response_mask, advantages in batches:
            # logits of positions prompt_len-1 .. width-2 score the response tokens prompt_len .. width-1
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=input_ids.shape[1] - prompt_len + 1).logits[:, :-1]
            log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
            labels = input_ids[:, prompt_len:]
            logprobs = log_p.gather(-1, labels[..., None]).squeeze(-1)[response_mask]
            with torch.no_grad():
                entropy = -(log_p.exp() * log_p).sum(-1)[response_mask]
            loss, _ = token_policy_loss(logprobs, advantages, entropy=entropy, config=config)
            loss.backward()
            total += loss.detach()
        return float(total)

    return step


@dataclass(frozen=True)
class Setup:
    """Everything but the response length that defines a step."""

    model: PreTrainedModel
    shape: ModelShape
    seqs: int
    prompt_len: int
    micro_batch: int
    device: torch.device
    attention_backend: str
    seed: int


def build_step(impl: str, setup: Setup, response_len: int) -> tuple[StepFn, StepInputs]:
    """The step function of `impl` at `response_len` and its inputs (the loss normalizes over all responses)."""
    x = make_step_inputs(setup.seqs, setup.prompt_len, response_len, setup.shape.vocab, setup.seed)
    config = PolicyLossConfig(norm_tokens=x.response_tokens)
    if impl == "fused_packed":
        capacity = setup.micro_batch * (setup.prompt_len + response_len)
        return fused_packed_step(setup.model, x, capacity=capacity, device=setup.device,
                                 attention_backend=setup.attention_backend, config=config), x
    assert impl == "materialized_padded", impl
    return materialized_padded_step(setup.model, x, micro_batch=setup.micro_batch, device=setup.device,
                                    config=config), x


def clear_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def release(model: torch.nn.Module, device: torch.device) -> None:
    clear_grads(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


@dataclass(frozen=True)
class Measurement:
    """One implementation at the benchmark length: median ms, peak bytes above the inputs (CUDA only), the step's
    loss and gradient norm; or `failure` ("OOM")."""

    time_ms: float | None = None
    peak_bytes: int | None = None
    loss: float | None = None
    grad_norm: float | None = None
    failure: str | None = None


def measure(step: StepFn, setup: Setup, *, warmup: int, repeat: int) -> Measurement:
    """Loss and gradient norm of one step, then the median step time, then the peak memory of one more step."""
    model, device = setup.model, setup.device
    try:
        clear_grads(model)
        loss = step()
        norm = grad_norm(model)
        ms = median_ms(lambda _: step(), device=device, warmup=warmup, repeat=repeat,
                       setup=lambda: clear_grads(model))
        peak = peak_memory_delta(lambda _: step(), device=device, setup=lambda: clear_grads(model))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        return Measurement(failure="OOM")
    finally:
        release(model, device)
    return Measurement(ms, peak, loss, norm)


@dataclass(frozen=True)
class SearchResult:
    """The largest length that fits (None: not even the smallest probe), whether the search stopped at its cap, and
    every probe as (length, fits)."""

    length: int | None
    capped: bool
    probes: tuple[tuple[int, bool], ...]


def max_fitting_length(fits: Callable[[int], bool], *, start: int, cap: int, granularity: int) -> SearchResult:
    """Largest multiple of `granularity` in [granularity, cap] for which `fits` holds, assuming it is monotone:
    doubling from `start` (the last probe is `cap`) until a failure, then bisection between the last success and the
    first failure until they are `granularity` apart."""
    if not 0 < granularity <= start <= cap:
        raise ValueError(f"need 0 < granularity <= start <= cap, got granularity={granularity}, start={start}, "
                         f"cap={cap}")
    probes: list[tuple[int, bool]] = []

    def probe(length: int) -> bool:
        ok = fits(length)
        probes.append((length, ok))
        return ok

    good, bad, length = 0, None, start
    while bad is None:
        if probe(length):
            good = length
            if length == cap:
                return SearchResult(cap, True, tuple(probes))
            length = min(2 * length, cap)
        else:
            bad = length
    while bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity
        if mid <= good:
            break
        if probe(mid):
            good = mid
        else:
            bad = mid
    return SearchResult(good or None, False, tuple(probes))


def fits_in_memory(impl: str, setup: Setup) -> Callable[[int], bool]:
    """`fits(response_len)`: one step of `impl` runs without an allocation failure."""
    def fits(response_len: int) -> bool:
        ok = True
        try:
            step, _ = build_step(impl, setup, response_len)
            step()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            ok = False
        finally:
            release(setup.model, setup.device)
        print(f"  {impl}: response_len {response_len}: {'fits' if ok else 'OOM'}", flush=True)
        return ok

    return fits


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=tuple(MODEL_SHAPES), default=None,
                   help="model shape (default qwen3-4b; tiny with --quick)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, 36 for qwen3-4b)")
    p.add_argument("--seqs", type=int, default=4, help="responses per step")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per response (default 1024; 16 quick)")
    p.add_argument("--response-len", type=int, default=None,
                   help="longest response of the measured step (default 8192; 64 quick)")
    p.add_argument("--padded-micro-batch", type=int, default=2,
                   help="sequences per padded micro-batch; the packed capacity is this × (prompt + response) tokens")
    p.add_argument("--impls", default=",".join(IMPL_NAMES), help=f"comma list of {', '.join(IMPL_NAMES)}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attention-backend", default="auto", help="varlen attention of the packed path")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--no-search", action="store_true", help="skip the max-response-length search")
    p.add_argument("--search-start", type=int, default=None, help="first probed length (default 1024; 32 quick)")
    p.add_argument("--search-cap", type=int, default=None, help="largest probed length (default 131072; 256 quick)")
    p.add_argument("--search-granularity", type=int, default=None, help="bisection step (default 256; 32 quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--repeat", type=int, default=3, help="timed steps; the median is reported")
    p.add_argument("--quick", action="store_true", help="CI smoke: tiny model, short responses, 1 warm-up, 2 repeats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="where train_step.jsonl goes")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"model": "tiny" if quick else "qwen3-4b", "prompt_len": 16 if quick else 1024,
                "response_len": 64 if quick else 8192, "search_start": 32 if quick else 1024,
                "search_cap": 256 if quick else 131072, "search_granularity": 32 if quick else 256,
                "dtype": "bf16" if args.device.startswith("cuda") else "fp32"}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick:
        args.warmup, args.repeat = 1, 2
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in args.impls if s not in IMPL_NAMES]
    if bad or not args.impls:
        p.error(f"--impls must be a comma list of {', '.join(IMPL_NAMES)}, got {bad or args.impls}")
    for name in ("seqs", "prompt_len", "response_len", "padded_micro_batch", "repeat", "search_granularity"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    if not args.search_granularity <= args.search_start <= args.search_cap:
        p.error(f"need --search-granularity <= --search-start <= --search-cap, got {args.search_granularity}, "
                f"{args.search_start}, {args.search_cap}")
    return args


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    base = MODEL_SHAPES[args.model]
    shape = ModelShape(**{**base.__dict__, "layers": args.layers or base.layers})
    model = build_model(shape, dtype=DTYPES[args.dtype], device=device,
                        gradient_checkpointing=not args.no_gradient_checkpointing, seed=args.seed)
    setup = Setup(model, shape, args.seqs, args.prompt_len, args.padded_micro_batch, device, args.attention_backend,
                  args.seed)
    info: dict[str, Any] = {"model": args.model, **shape.__dict__, "seqs": args.seqs, "prompt_len": args.prompt_len,
                            "response_len": args.response_len, "padded_micro_batch": args.padded_micro_batch,
                            "dtype": args.dtype, "gradient_checkpointing": not args.no_gradient_checkpointing}
    params = sum(p.numel() for p in model.parameters())
    print(f"## {args.model} ({shape.layers} layers, {params / 1e6:,.1f} M parameters) {args.dtype} on "
          f"{device_name(device)}: {args.seqs} responses of {response_lengths(args.seqs, args.response_len)} tokens "
          f"after {args.prompt_len}-token prompts")
    rows: list[Row] = []
    table = []
    for impl in args.impls:
        step, x = build_step(impl, setup, args.response_len)
        m = measure(step, setup, warmup=args.warmup, repeat=args.repeat)
        del step
        search = None
        if not args.no_search:
            search = max_fitting_length(fits_in_memory(impl, setup), start=args.search_start, cap=args.search_cap,
                                        granularity=args.search_granularity)
            rows.append(Row("train_step", impl, {**info, "search_cap": args.search_cap}, "max_response_len",
                            search.length if search.length is not None else "OOM", "tokens"))
        fit = "-" if search is None else f"{'>= ' if search.capped else ''}{search.length or 'OOM'}"
        if m.failure:
            rows.append(Row("train_step", impl, info, "time", m.failure, "ms"))
            table.append([impl, m.failure, "-", "-", "-", "-", fit])
            continue
        assert m.time_ms is not None and m.loss is not None and m.grad_norm is not None
        tokens_per_s = x.tokens / (m.time_ms / 1e3)
        rows += [Row("train_step", impl, info, "time", m.time_ms, "ms"),
                 Row("train_step", impl, info, "tokens_per_s", tokens_per_s, "tokens/s"),
                 Row("train_step", impl, info, "loss", m.loss, ""),
                 Row("train_step", impl, info, "grad_norm", m.grad_norm, "")]
        if m.peak_bytes is not None:
            rows.append(Row("train_step", impl, info, "peak_mem_delta", m.peak_bytes, "bytes"))
        table.append([impl, f"{m.time_ms:.1f}", f"{tokens_per_s:,.0f}",
                      _fmt(None if m.peak_bytes is None else m.peak_bytes / MIB, ".0f"), f"{m.loss:.6f}",
                      f"{m.grad_norm:.6g}", fit])
    print(markdown_table(TABLE_HEADERS, table))
    path = append_rows(rows, name="train_step", results_dir=args.results_dir, meta=run_metadata(device))
    print(f"\nWrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
