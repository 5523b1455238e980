"""Varlen causal attention (Triton kernels under the interpreter on CPU, the torch backend and the transformers
hook) against a float64 reference that materializes the masked softmax of every sequence."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels module imports triton

from dsrl_fast.model.attention import TRANSFORMERS_ATTENTION_NAME, register_transformers_attention
from dsrl_fast.ops.varlen_attention import packed_metadata_from_position_ids, varlen_attention
from dsrl_fast.kernels.varlen_attention import INTERPRETER_CONFIG, varlen_attention_fwd  # noqa: E402
from dsrl_fast.kernels.varlen_attention_bwd import varlen_attention_bwd  # noqa: E402
from tests.conftest import KERNEL_DEVICE  # noqa: E402
from tests.numerics import assert_within_budget  # noqa: E402

# Budget on top of 2x the error of PyTorch's SDPA at the input dtype, relative to max(|reference|, 1). The
# interpreter computes fp32/fp16 dots exactly, so the fp32 budget sits well above the observed ~1e-6.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Lengths cover 1, non-powers of two, several query/key blocks of INTERPRETER_CONFIG (32/16 and 16/32) and tails.
LENS = [7, 1, 49, 10]


def cu_from_lens(lens: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_qkv(total: int, hq: int, hkv: int, d: int, dtype: torch.dtype,
             device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # q has std 2 so the softmax is peaked (scores of std ~2 after the 1/sqrt(d) scale), not flat.
    q = 2.0 * torch.randn(total, hq, d, dtype=torch.float64)
    k = torch.randn(total, hkv, d, dtype=torch.float64)
    v = torch.randn(total, hkv, d, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))


def reference_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float) -> torch.Tensor:
    """(T, Hq, D) float64 causal attention, sequence by sequence, from explicit masked score matrices."""
    group = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lens:
        qs = q[start:start + n].double().transpose(0, 1)
        ks = k[start:start + n].double().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[start:start + n].double().transpose(0, 1).repeat_interleave(group, 0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append((probs @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def peer_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float) -> torch.Tensor:
    """PyTorch SDPA at the input dtype, sequence by sequence: the error yardstick."""
    group = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1).repeat_interleave(group, 0),
            v[sl].transpose(0, 1).repeat_interleave(group, 0), is_causal=True, scale=scale)
        outs.append(o.transpose(0, 1))
        start += n
    return torch.cat(outs)


def grads(out: torch.Tensor, dout: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, dout.to(out.dtype))


def check_against_reference(name: str, out: torch.Tensor, d_ours: tuple[torch.Tensor, ...], q: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lens: list[int],
                            scale: float) -> None:
    """Outputs and (dq, dk, dv) within 2x SDPA's own error at q's dtype + RTOL x max(|reference|, 1)."""
    truth_in = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    truth = reference_f64(*truth_in, lens, scale)
    d_truth = grads(truth, dout, truth_in)
    peer_in = tuple(t.detach().cpu().requires_grad_() for t in (q, k, v))
    peer = peer_sdpa(*peer_in, lens, scale)
    d_peer = grads(peer, dout.cpu(), peer_in)
    rtol = RTOL[q.dtype]
    for label, ours, ref, p in zip(("out", "dq", "dk", "dv"), (out, *d_ours), (truth, *d_truth), (peer, *d_peer)):
        assert ours.dtype == q.dtype
        scale = max(ref.abs().max().item(), 1.0)  # floor of 1: length-1 sequences have dq = dk = 0 exactly
        assert_within_budget(f"{name} {label}", ours.cpu(), p, ref.cpu(), atol=rtol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("hkv", [2, 4], ids=["gqa", "mha"])
def test_kernels_match_reference(dtype: torch.dtype, head_dim: int, hkv: int) -> None:
    q, k, v = make_qkv(sum(LENS), 4, hkv, head_dim, dtype, KERNEL_DEVICE)
    dout = torch.randn(q.shape, dtype=torch.float64)
    cu = cu_from_lens(LENS, KERNEL_DEVICE)
    scale = 0.7 / math.sqrt(head_dim)
    with torch.no_grad():
        out, lse = varlen_attention_fwd(q, k, v, cu, max(LENS), scale, INTERPRETER_CONFIG)
        d_ours = varlen_attention_bwd(dout.to(q), q, k, v, out, lse, cu, max(LENS), scale, INTERPRETER_CONFIG)
    check_against_reference(f"kernels {dtype} d={head_dim} hkv={hkv}", out, d_ours, q, k, v, dout, LENS, scale)


def test_kernels_logsumexp() -> None:
    q, k, v = make_qkv(sum(LENS), 4, 2, 64, torch.float32, KERNEL_DEVICE)
    cu = cu_from_lens(LENS, KERNEL_DEVICE)
    scale = 1 / 8
    with torch.no_grad():
        _, lse = varlen_attention_fwd(q, k, v, cu, max(LENS), scale, INTERPRETER_CONFIG)
    truth, start = [], 0
    for n in LENS:
        scores = torch.einsum("qhd,khd->hqk", q[start:start + n].double(),
                              k[start:start + n].double().repeat_interleave(2, 1)) * scale
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        truth.append(scores.masked_fill(~causal, float("-inf")).logsumexp(-1))
        start += n
    torch.testing.assert_close(lse.double(), torch.cat(truth, dim=1), rtol=0, atol=1e-5)


def test_kernels_all_length_one() -> None:
    """Every token is its own sequence: out = v of its KV head, dq = dk = 0, dv = sum of dout over the group."""
    lens = [1] * 9
    q, k, v = make_qkv(9, 4, 2, 64, torch.float32, KERNEL_DEVICE)
    dout = torch.randn(q.shape, dtype=torch.float64)
    cu = cu_from_lens(lens, KERNEL_DEVICE)
    with torch.no_grad():
        out, lse = varlen_attention_fwd(q, k, v, cu, 1, 0.125, INTERPRETER_CONFIG)
        dq, dk, dv = varlen_attention_bwd(dout.to(q), q, k, v, out, lse, cu, 1, 0.125, INTERPRETER_CONFIG)
    torch.testing.assert_close(out, v.detach().repeat_interleave(2, 1), rtol=0, atol=0)
    # p = 1 exactly, so ds = dO.v - rowsum(dO * O) vanishes up to fp32 summation-order rounding.
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5
    torch.testing.assert_close(dv.cpu().double(), dout.view(9, 2, 2, 64).sum(2), rtol=0, atol=1e-6)
    check_against_reference("length 1", out, (dq, dk, dv), q, k, v, dout, lens, 0.125)


def test_kernels_non_power_of_two_head_dim() -> None:
    lens = [5, 33]
    q, k, v = make_qkv(sum(lens), 4, 2, 48, torch.float32, KERNEL_DEVICE)
    dout = torch.randn(q.shape, dtype=torch.float64)
    cu = cu_from_lens(lens, KERNEL_DEVICE)
    scale = 1 / math.sqrt(48)
    with torch.no_grad():
        out, lse = varlen_attention_fwd(q, k, v, cu, 33, scale, INTERPRETER_CONFIG)
        d_ours = varlen_attention_bwd(dout.to(q), q, k, v, out, lse, cu, 33, scale, INTERPRETER_CONFIG)
    check_against_reference("d=48", out, d_ours, q, k, v, dout, lens, scale)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_public_function_strided_inputs(backend: str) -> None:
    """q/k/v sliced from one fused projection (token stride != heads x dim), an empty sequence, default tiles."""
    lens = [3, 0, 40, 1, 17]
    hq, hkv, d = 4, 2, 64
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    fused = torch.randn(sum(lens), hq + 2 * hkv, d, dtype=torch.float64)
    fused[:, :hq] *= 2.0
    fused = fused.to(device=device, dtype=torch.float32).requires_grad_()
    q, k, v = fused.split([hq, hkv, hkv], dim=1)
    dout = torch.randn(q.shape, dtype=torch.float64)
    out = varlen_attention(q, k, v, cu_from_lens(lens, device), 64, backend=backend)
    d_ours = grads(out, dout.to(device), (q, k, v))
    check_against_reference(f"public {backend}", out, d_ours, q, k, v, dout, lens, 1 / 8)


def test_torch_backend_float64_is_exact() -> None:
    q, k, v = make_qkv(sum(LENS), 4, 2, 32, torch.float64, "cpu")
    out = varlen_attention(q, k, v, cu_from_lens(LENS), max(LENS), softmax_scale=0.3, backend="torch")
    torch.testing.assert_close(out, reference_f64(q, k, v, LENS, 0.3), rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs CUDA: the Triton interpreter computes bf16 wrong")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_bf16_on_gpu(head_dim: int) -> None:
    lens = [300, 1, 77, 1000, 129]
    q, k, v = make_qkv(sum(lens), 8, 2, head_dim, torch.bfloat16, "cuda")
    dout = torch.randn(q.shape, dtype=torch.float64)
    out = varlen_attention(q, k, v, cu_from_lens(lens, "cuda"), max(lens), backend="triton")
    d_ours = grads(out, dout.cuda(), (q, k, v))
    check_against_reference(f"bf16 d={head_dim}", out, d_ours, q, k, v, dout, lens, 1 / math.sqrt(head_dim))


def _bad_inputs() -> list[tuple[str, dict, type, str]]:
    q, k = torch.randn(10, 4, 16), torch.randn(10, 2, 16)
    cu = cu_from_lens([4, 6])
    return [
        ("q ndim", dict(q=q[0]), ValueError, "q must have 3 dims"),
        ("k dtype", dict(k=k.double(), v=k.double()), TypeError, "k must have dtype"),
        ("v shape", dict(v=k[:, :1]), ValueError, "v must have k's shape"),
        ("k tokens", dict(k=k[:9], v=k[:9]), ValueError, "k must have shape"),
        ("heads", dict(q=torch.randn(10, 3, 16)), ValueError, "multiple of k's"),
        ("cu dtype", dict(cu_seqlens=cu.long()), TypeError, "cu_seqlens must have dtype"),
        ("cu start", dict(cu_seqlens=cu + 1), ValueError, "start at 0"),
        ("cu order", dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError, "non-decreasing"),
        ("cu end", dict(cu_seqlens=cu_from_lens([4, 5])), ValueError, r"cu_seqlens\[-1\] must equal"),
        ("max_seqlen small", dict(max_seqlen=5), ValueError, "max_seqlen must be >= the longest"),
        ("max_seqlen type", dict(max_seqlen=6.0), ValueError, "max_seqlen must be a positive int"),
        ("scale", dict(softmax_scale=-1.0), ValueError, "softmax_scale must be > 0"),
        ("backend", dict(backend="cuda"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_invalid_inputs_raise(case: tuple[str, dict, type, str]) -> None:
    _, override, error, match = case
    args = dict(q=torch.randn(10, 4, 16), k=torch.randn(10, 2, 16), v=torch.randn(10, 2, 16),
                cu_seqlens=cu_from_lens([4, 6]), max_seqlen=6, backend="torch")
    args.update(override)
    with pytest.raises(error, match=match):
        varlen_attention(**args)


def test_flash_attn_backend_without_package_says_so() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        q, k = torch.randn(4, 2, 16, dtype=torch.float16), torch.randn(4, 2, 16, dtype=torch.float16)
        with pytest.raises(ImportError, match="needs the flash-attn package"):
            varlen_attention(q, k, k, cu_from_lens([4]), 4, backend="flash_attn")
    else:
        pytest.skip("flash-attn is installed; its error path cannot be exercised")


def test_packed_metadata_from_position_ids() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 0, 1]])
    cu, longest = packed_metadata_from_position_ids(pos, 1, 10)
    assert cu.tolist() == [0, 3, 4, 8, 10] and cu.dtype == torch.int32 and longest == 4
    cu, longest = packed_metadata_from_position_ids(torch.tensor([[0, 1, 2]]).expand(2, 3), 2, 3)
    assert cu.tolist() == [0, 3, 6] and longest == 3


@pytest.mark.parametrize("metadata", ["position_ids", "cu_seq_lens"])
def test_transformers_packed_qwen3_matches_unpacked_eager(metadata: str) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, vocab_size=101, max_position_embeddings=128)
    model = transformers.Qwen3ForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager",
                                                       dtype=torch.float32).eval()
    lens = [5, 1, 12]
    seqs = [torch.randint(0, 101, (1, n)) for n in lens]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s, use_cache=False).logits for s in seqs], dim=1)
        assert register_transformers_attention(backend="torch") == TRANSFORMERS_ATTENTION_NAME
        model.set_attn_implementation(TRANSFORMERS_ATTENTION_NAME)
        position_ids = torch.cat([torch.arange(n) for n in lens])[None]
        extra = {}
        if metadata == "cu_seq_lens":
            cu = cu_from_lens(lens)
            extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
        packed = model(input_ids=torch.cat(seqs, dim=1), position_ids=position_ids, attention_mask=None,
                       use_cache=False, **extra).logits
    assert model.config._attn_implementation == TRANSFORMERS_ATTENTION_NAME
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("metadata", ["cu_seq_lens", "position_ids", "rows"])
def test_transformers_attention_function_layouts(metadata: str) -> None:
    """The registered function on (B, H, L, D) inputs: packed metadata from kwargs, from position_ids, or one
    sequence per batch row."""
    transformers = pytest.importorskip("transformers")
    fn = transformers.AttentionInterface()[register_transformers_attention(backend="torch")]
    batch, seq_len = (1, 14) if metadata != "rows" else (2, 7)
    lens = [5, 1, 8] if metadata != "rows" else [7, 7]
    query = torch.randn(batch, 4, seq_len, 32, dtype=torch.float64)
    key, value = torch.randn(2, batch, 2, seq_len, 32, dtype=torch.float64)
    kwargs = {}
    if metadata == "cu_seq_lens":
        kwargs = dict(cu_seq_lens_q=cu_from_lens(lens), max_length_q=8, position_ids=torch.zeros(1, seq_len))
    elif metadata == "position_ids":
        kwargs = dict(position_ids=torch.cat([torch.arange(n) for n in lens])[None])
    out, weights = fn(torch.nn.Module(), query, key, value, None, scaling=0.2, dropout=0.0, **kwargs)
    assert weights is None and out.shape == (batch, seq_len, 4, 32)
    flat = [t.transpose(1, 2).reshape(-1, t.shape[1], 32) for t in (query, key, value)]
    torch.testing.assert_close(out.reshape(-1, 4, 32), reference_f64(*flat, lens, 0.2), rtol=0, atol=1e-12)


def test_transformers_hook_refuses_padding_mask() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, vocab_size=101)
    model = transformers.Qwen3ForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    model.set_attn_implementation(register_transformers_attention(backend="torch"))
    ids = torch.randint(0, 101, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="attention_mask must be None"):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
