"""Peak memory of one packed training micro-batch, found by running it on the meta device.

The real transformers model is built on the meta device (no weights, no memory) and one packed micro-batch runs its
forward and backward there. Every storage an operator creates is counted until it is freed, so the peak covers what
autograd saves, the recomputation of gradient checkpointing and the transient tensors of the backward, exactly as
the installed transformers version lays them out. Two pieces cannot run on meta tensors and are replaced by stand-ins
that allocate what the real ones allocate:

- the packed varlen attention (dsrl_fast.ops.varlen_attention): the Triton and flash-attn kernels save q, k, v, out and an fp32
  logsumexp (Hq, T), and their backward allocates an fp32 delta (Hq, T) and dq, dk, dv;
- the fused log-prob op, by `LossWorkspace.kind` (see there).

The policy loss on top of the log-probs is O(N) and modelled as a few (N,) fp32 vectors.

Depth: the decoder layers of a model are alike, so the peak is affine in their number (exactly: the stored activations
grow by one layer's worth per layer and the transient peak of a backward step is one layer's). A deep model with
identical layers is therefore run at 1, 2 and 3 layers and extrapolated; the three runs must lie on one line, or the
full depth runs. This makes a 36-layer plan about ten times faster and gives the same bytes.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dsrl_fast.ops.torch_logprobs import ChunkedLinearLogprobs, backward_rows

LOSS_KINDS = ("no_logits", "grad_in_forward", "torch")
META_ATTENTION_NAME = "dsrl_plan_meta"
# Streaming multiprocessors of an H100/H200 (the fused forward sizes its vocabulary splits by them).
GPU_SMS = 132
# Layer counts run before extrapolating a deep model's peak by its depth.
PROBE_DEPTHS = (1, 2, 3)
# The gradient-in-forward path's default budget for its chunk of fp32 logits (dsrl_fast.loss.policy_loss).
GRAD_IN_FORWARD_WORKSPACE = 1 << 30


@dataclass(frozen=True)
class LossWorkspace:
    """Memory model of the fused log-prob op for N scored tokens, hidden H, vocabulary V, model dtype of d bytes.

    kind:
        "no_logits": the Triton op (dsrl_fast/ops/linear_logprobs.py): forward partial statistics (4, splits, N)
            fp32; the backward holds a dz slice (N, S) in the model dtype, S = vocabulary columns whose dz stays
            within `slice_share` of the fp32 logits (N·V·4 bytes), an fp32 d_hidden accumulator (N, H) and d_weight
            (V, H) written once per slice in the model dtype.
        "grad_in_forward": the gradient computed in the forward (6·N·H·V): a chunk of fp32 logits of
            `workspace_bytes` (whole rows of V), d_hidden (N, H) in the model dtype and d_weight (V, H) in the model
            dtype (fp32 with `weight_grad_fp32`), the two gradients held from the forward until the backward.
        "torch": the PyTorch path (dsrl_fast/ops/torch_logprobs.py), run for real in the forward; its backward is
            replayed with every row active.
    slice_share: "no_logits" dz slice as a share of the fp32 logits, in (0, 1]; None takes the kernel's default.
    workspace_bytes: "grad_in_forward" budget of the fp32 logits chunk, >= 1 (at least one row is used).
    weight_grad_fp32: "grad_in_forward" accumulates d_weight in fp32.
    """

    kind: str = "no_logits"
    slice_share: float | None = None
    workspace_bytes: int = GRAD_IN_FORWARD_WORKSPACE
    weight_grad_fp32: bool = False

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {self.kind!r}")
        if self.slice_share is not None and not 0.0 < self.slice_share <= 1.0:
            raise ValueError(f"slice_share must be in (0, 1] or None, got {self.slice_share!r}")
        if isinstance(self.workspace_bytes, bool) or not isinstance(self.workspace_bytes, int) \
                or self.workspace_bytes < 1:
            raise ValueError(f"workspace_bytes must be an int >= 1, got {self.workspace_bytes!r}")
        if not isinstance(self.weight_grad_fp32, bool):
            raise TypeError(f"weight_grad_fp32 must be a bool, got {type(self.weight_grad_fp32).__name__}")


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages relative to when the mode was created, and their peak.

    Storages of `existing` (parameters, gradients, inputs) are live from the start and count when they are freed
    (a gradient that autograd replaces by a new tensor, say); every storage an operator creates under the mode counts
    until it is freed. `live` and `peak` are in bytes over the start.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}
        for tensor in existing:
            storage = tensor.untyped_storage()
            self._track(storage, storage.nbytes())
        self.live = self.peak = 0

    def _forget(self, key: int, nbytes: int) -> None:
        self._seen.pop(key, None)
        self.live -= nbytes

    def _track(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        key = storage._cdata
        if key in self._seen:
            return
        self._seen[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._forget(key, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                self._track(storage, storage.nbytes())
        return out


class _AttentionStandIn(torch.autograd.Function):
    """Allocations of the varlen attention kernels: (q (T, Hq, D), k, v (T, Hkv, D)) -> out (T, Hq, D)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, lse = ctx.saved_tensors
        dout = dout.contiguous()
        delta = torch.empty_like(lse)
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del delta, dout
        return grads


def _meta_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function with dsrl_fast.model.attention's layout: (B, H, L, D) -> ((B, L, Hq, D), None)."""
    batch, hq, seq_len, head_dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], head_dim) for t in (query, key, value))
    return _AttentionStandIn.apply(q, k, v).view(batch, seq_len, hq, head_dim), None


def _register_meta_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(META_ATTENTION_NAME, _meta_attention)
    AttentionMaskInterface.register(META_ATTENTION_NAME, flash_attention_mask)
    return META_ATTENTION_NAME


def _slice_width(vocab: int, element_size: int, hidden: int, share: float | None) -> int:
    from dsrl_fast.kernels import linear_logprobs as kernels

    if share is None:
        return min(kernels.slice_width(vocab, element_size, hidden), vocab)
    multiple = kernels.SLICE_MULTIPLE
    width = int(share * vocab * 4 / element_size) // multiple * multiple
    return min(max(multiple, width), vocab)


def _no_logits_forward(hidden: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs (N,), lse (N,)) fp32 after the allocations of the fused forward (partials, then their merge)."""
    from dsrl_fast.kernels import linear_logprobs as kernels

    n = hidden.shape[0]
    cfg = kernels.gpu_config("forward", hidden.dtype)
    splits = kernels.num_splits(math.ceil(n / cfg.block_n), math.ceil(vocab / cfg.block_v), GPU_SMS)
    stats = hidden.new_empty((4, splits, n), dtype=torch.float32)
    lse, label_logit, _ = kernels.combine_partials(kernels.Partials(stats[0], stats[1], stats[2], stats[3]))
    return label_logit - lse, lse


class _KernelLossStandIn(torch.autograd.Function):
    """Allocations of the "no_logits" and "grad_in_forward" ops: (hidden (N, H), weight (V, H)) -> (N,) fp32.

    workspace None: an op that costs nothing beyond its (N,) output and d_hidden (no weight gradient).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, workspace: LossWorkspace | None) -> torch.Tensor:
        n = hidden.shape[0]
        vocab = weight.shape[0]
        ctx.workspace = workspace
        if workspace is None:
            ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
            return hidden.new_empty(n, dtype=torch.float32)
        if workspace.kind == "grad_in_forward":
            logprobs = hidden.new_empty(n, dtype=torch.float32)
            entropy = torch.empty_like(logprobs)
            d_hidden = torch.empty_like(hidden)
            d_weight = weight.new_zeros(weight.shape, dtype=torch.float32 if workspace.weight_grad_fp32
                                        else weight.dtype)
            rows = min(n, max(1, workspace.workspace_bytes // (vocab * 4)))
            buffer = hidden.new_empty((rows, vocab), dtype=torch.float32)
            row_copies = hidden.new_empty((2, rows, hidden.shape[1]))  # gathered rows and dz @ weight
            del row_copies
            d_weight = d_weight.to(weight.dtype)
            del buffer, entropy
            ctx.save_for_backward(d_hidden, d_weight)
            return logprobs
        logprobs, lse = _no_logits_forward(hidden, vocab)
        ctx.save_for_backward(hidden, weight, lse)
        return logprobs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        workspace: LossWorkspace | None = ctx.workspace
        if workspace is None:
            return grad.new_empty(ctx.hidden_shape, dtype=ctx.hidden_dtype), None, None
        if workspace.kind == "grad_in_forward":
            d_hidden, d_weight = ctx.saved_tensors
            return d_hidden.mul_(1), d_weight.mul_(1), None
        hidden, weight, lse = ctx.saved_tensors
        n, h_dim = hidden.shape
        g_logp = grad.float().contiguous()
        width = _slice_width(weight.shape[0], hidden.element_size(), h_dim, workspace.slice_share)
        dz = hidden.new_empty((n, width))
        dh_acc = hidden.new_zeros((n, h_dim), dtype=torch.float32)
        d_weight = torch.empty_like(weight)
        del dz, g_logp, lse
        return dh_acc.to(hidden.dtype), d_weight, None


class _TorchLossStandIn(ChunkedLinearLogprobs):
    """The PyTorch path: its own forward; a backward replaying its allocations with every row active."""

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor | None,
                 grad_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        hidden, _, _, lse, _ = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        every_row = torch.arange(hidden.shape[0], device=hidden.device)
        d_hidden, d_weight = backward_rows(ctx.saved_tensors, grad_logprobs, grad_entropy, every_row, ctx.inv_t,
                                           need_hidden=True, need_weight=True)
        return d_hidden, d_weight, None, None, None


def _loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, workspace: LossWorkspace | None,
          entropy_gradient: bool) -> torch.Tensor:
    """Scalar loss of one micro-batch: the log-prob op, then the O(N) policy loss as a few (N,) fp32 vectors.

    entropy_gradient: the loss depends on the entropy (an entropy bonus), so the op's entropy gets a gradient.
    """
    if workspace is not None and workspace.kind == "torch":
        logprobs, entropy = _TorchLossStandIn.apply(hidden, weight, labels, 1.0, True)
    else:
        logprobs = _KernelLossStandIn.apply(hidden, weight, workspace)
        entropy = torch.empty_like(logprobs)
    advantages = torch.empty_like(logprobs)
    ratio = torch.exp(logprobs - logprobs.detach())
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    loss = per_token.sum()
    return loss - entropy.sum() if entropy_gradient else loss


def _meta_model(config: Any, dtype: torch.dtype, gradient_checkpointing: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    model.config._attn_implementation = _register_meta_attention()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def micro_batch_peak(config: Any, *, dtype: torch.dtype, tokens: int, scored: int, gradient_checkpointing: bool,
                     workspace: LossWorkspace | None, entropy_gradient: bool = False,
                     first_micro_batch: bool = False) -> int:
    """Peak bytes of one packed micro-batch's forward + backward, over the parameters and their gradients.

    config: a transformers causal-LM config (see dsrl_fast.planning.shapes.model_config).
    dtype: parameter and activation dtype. tokens: packed tokens T >= 1. scored: loss-masked tokens N in [1, T].
    gradient_checkpointing: as `model.gradient_checkpointing_enable()` does it.
    workspace: the fused loss's memory model; None charges the loss nothing but d_hidden (and gives the LM head no
    gradient from it), which isolates the trunk's activations.
    entropy_gradient: the loss has an entropy bonus (algo.entropy_coef != 0): the torch path's backward then also
    forms the entropy gradient.
    first_micro_batch: False: the gradients exist before the micro-batch (as from a step's second micro-batch on);
    True: they are created by its backward (the first micro-batch after the optimizer step freed them), which can
    peak higher when autograd copies a gradient instead of taking it over. Either way the result excludes the
    gradients' own bytes.
    """
    for name, value, low in (("tokens", tokens, 1), ("scored", scored, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if scored > tokens:
        raise ValueError(f"scored must be <= tokens ({tokens}), got {scored}")
    run = functools.partial(_run_micro_batch, dtype=dtype, tokens=tokens, scored=scored,
                            gradient_checkpointing=gradient_checkpointing, workspace=workspace,
                            entropy_gradient=entropy_gradient, first_micro_batch=first_micro_batch)
    depth = getattr(config, "num_hidden_layers", 0)
    if depth <= sum(PROBE_DEPTHS) or not _layers_alike(config):  # the probes cost sum(PROBE_DEPTHS) layers
        return run(config)
    p1, p2, p3 = (run(_with_depth(config, layers)) for layers in PROBE_DEPTHS)
    if p2 - p1 != p3 - p2:
        return run(config)
    return p1 + (depth - 1) * (p2 - p1)


def _with_depth(config: Any, layers: int) -> Any:
    """A copy of transformers config `config` with its first `layers` decoder layers."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:layers]
    return config


def _layers_alike(config: Any) -> bool:
    """True when every decoder layer of `config` has the same class and parameter shapes, and attention kinds that
    allocate alike (full or sliding-window: the same kernels)."""
    kinds = set(getattr(config, "layer_types", None) or ())
    if not kinds <= {"full_attention", "sliding_attention"}:
        return False
    return _layer_signatures_alike(config.to_json_string())


@functools.lru_cache(maxsize=8)
def _layer_signatures_alike(config_json: str) -> bool:
    """_layers_alike's model check, once per config (given as its JSON text)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = json.loads(config_json)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        return False
    signatures = {(type(layer), tuple((name, p.shape) for name, p in layer.named_parameters())) for layer in layers}
    return len(signatures) == 1


def _run_micro_batch(config: Any, *, dtype: torch.dtype, tokens: int, scored: int, gradient_checkpointing: bool,
                     workspace: LossWorkspace | None, entropy_gradient: bool, first_micro_batch: bool) -> int:
    """micro_batch_peak at the full depth of `config` (its arguments are checked there)."""
    model = _meta_model(config, dtype, gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    if not first_micro_batch:
        for p in params:
            p.grad = torch.zeros_like(p)
    input_ids = torch.zeros((1, tokens), dtype=torch.long, device="meta")
    position_ids = torch.zeros((1, tokens), dtype=torch.long, device="meta")
    masked_idx = torch.zeros(scored, dtype=torch.long, device="meta")
    labels = torch.zeros(scored, dtype=torch.long, device="meta")
    head = model.get_output_embeddings().weight
    # A dict of masks is taken as already prepared: the packed attention needs none (as in dsrl_fast.model.packed).
    masks = {kind: None for kind in set(model.config.layer_types)} if hasattr(model.config, "layer_types") else None
    inputs = [input_ids, position_ids, masked_idx, labels]
    grads = [] if first_micro_batch else [p.grad for p in params]
    with LiveBytes(existing=[*params, *grads, *model.buffers(), *inputs]) as tracker:
        out = model.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=masks,
                                  use_cache=False)
        hidden = out.last_hidden_state[0].index_select(0, masked_idx)
        del out
        loss = _loss(hidden, head, labels, workspace, entropy_gradient)
        del hidden
        loss.backward()
        del loss
    if first_micro_batch:
        return tracker.peak - sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
    return tracker.peak
