"""Padding-free packing of conditional ``[x; y]`` and marginal ``[prefix; y]`` sequences.

Every sequence of a packed batch is laid end to end in one row of ``T`` tokens with position ids restarting at 0,
the layout of flash-attention's varlen interface (``cu_seqlens``, ``max_seqlen``). A sample contributes its
conditional sequence (space ``"cond"``), its marginal sequence (``"marg"``) or both (``"both"``, conditional first).

Each scored response token needs at least one context token, so the prompt of a ``"cond"`` sample and the prefix of
a ``"marg"`` sample must be non-empty (a ValueError otherwise); then every response token, the first included, is
scored, and a sequence has exactly ``len(response)`` loss-masked positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

SPACES = ("cond", "marg")
DEFAULT_PREFIX: tuple[int, ...] = (151644,)  # Qwen's <|im_start|>, the marginal context of the reference code


def default_marginal_prefix(tokenizer: Any) -> tuple[int, ...]:
    """The marginal context of `tokenizer`: its <|im_start|> id (the authors' choice), else its BOS id (ValueError
    when it has neither)."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if isinstance(im_start, int) and im_start != tokenizer.unk_token_id:
        return (im_start,)
    if tokenizer.bos_token_id is None:
        raise ValueError("tokenizer has neither <|im_start|> nor a BOS token: pass marginal_prefix explicitly")
    return (tokenizer.bos_token_id,)

TokenIds = Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class PackedBatch:
    """Packed sequences of ``num_samples`` samples; ``T`` tokens, ``S`` sequences, ``M`` loss-masked tokens.

    input_ids: (T,) int64. position_ids: (T,) int64, restarting at 0 per sequence.
    cu_seqlens: (S+1,) int32 sequence boundaries. max_seqlen: int, longest sequence.
    labels: (T,) int64, ``labels[t] = input_ids[t+1]`` inside a sequence, 0 at each sequence's last position.
    loss_mask: (T,) bool, True exactly where the label is a response token.
    masked_idx: (M,) int64, ``loss_mask.nonzero()[:, 0]``, computed on the host so using it never syncs.
    seq_ids: (T,) int64 sequence index of each token. seq_sample: (S,) int64 sample index of each sequence
    (into the samples given to ``pack``); seq_sample_host: the same as host ints, so ``unpack`` never syncs.
    seq_space: space of each sequence, ``"cond"`` or ``"marg"``.
    seq_response_lens: response length of each sequence (its number of loss-masked tokens).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor
    loss_mask: torch.Tensor
    masked_idx: torch.Tensor
    seq_ids: torch.Tensor
    seq_sample: torch.Tensor
    seq_sample_host: tuple[int, ...]
    seq_space: tuple[str, ...]
    seq_response_lens: tuple[int, ...]
    num_samples: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_masked(self) -> int:
        return sum(self.seq_response_lens)

    def masked_indices(self) -> torch.Tensor:
        """(M,) int64 positions of the loss-masked tokens, in packed order."""
        return self.masked_idx

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            is_tensor = isinstance(value, torch.Tensor)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if is_tensor else value
        return PackedBatch(**moved)


def _as_ids(ids: TokenIds, name: str) -> torch.Tensor:
    """Token ids as a (n,) int64 CPU tensor; TypeError/ValueError naming ``name`` if they are not ids."""
    if isinstance(ids, torch.Tensor):
        tensor = ids.detach().cpu()
    elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        if len(ids) == 0:
            return torch.empty(0, dtype=torch.int64)
        try:
            tensor = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must hold integer token ids, got {list(ids)[:8]!r}") from err
    else:
        raise TypeError(f"{name} must be a sequence of ints or a 1-D int tensor, got {type(ids).__name__}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{name} must hold non-negative token ids, got {int(tensor.min())}")
    return tensor.to(torch.int64)


def _normalize(
    prompts: Sequence[TokenIds], responses: Sequence[TokenIds], spaces: str | Sequence[str], prefix: TokenIds
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[str, ...]], torch.Tensor]:
    """Validated inputs: prompt and response id tensors, the spaces of each sample, the prefix tensor."""
    for name, arg in (("prompts", prompts), ("responses", responses)):
        if not isinstance(arg, (list, tuple)):
            raise TypeError(f"{name} must be a list of token id sequences, got {type(arg).__name__}")
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    n = len(prompts)
    space_list = [spaces] * n if isinstance(spaces, str) else list(spaces)
    if len(space_list) != n:
        raise ValueError(f"spaces must be a string or have one entry per sample ({n}), got {len(space_list)}")
    sample_spaces: list[tuple[str, ...]] = []
    for i, space in enumerate(space_list):
        if space not in ("cond", "marg", "both"):
            raise ValueError(f"spaces[{i}] must be 'cond', 'marg' or 'both', got {space!r}")
        sample_spaces.append(SPACES if space == "both" else (space,))
    prefix_ids = _as_ids(prefix, "prefix")
    prompt_ids = [_as_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    response_ids = [_as_ids(r, f"responses[{i}]") for i, r in enumerate(responses)]
    for i, (prompt, response, used) in enumerate(zip(prompt_ids, response_ids, sample_spaces)):
        if response.numel() == 0:
            raise ValueError(f"responses[{i}] must be non-empty, got 0 tokens")
        if "cond" in used and prompt.numel() == 0:
            raise ValueError(f"prompts[{i}] must be non-empty for space 'cond' (its first token is the context)")
        if "marg" in used and prefix_ids.numel() == 0:
            raise ValueError(f"prefix must be non-empty when spaces[{i}] uses 'marg', got an empty prefix")
    return prompt_ids, response_ids, sample_spaces, prefix_ids


def _pack(
    prompts: list[torch.Tensor], responses: list[torch.Tensor], spaces: list[tuple[str, ...]], prefix: torch.Tensor
) -> PackedBatch:
    pieces, seq_lens, ctx_lens, seq_sample, seq_space, resp_lens = [], [], [], [], [], []
    for i, (prompt, response, used) in enumerate(zip(prompts, responses, spaces)):
        for space in used:
            context = prompt if space == "cond" else prefix
            pieces += [context, response]
            seq_lens.append(context.numel() + response.numel())
            ctx_lens.append(context.numel())
            seq_sample.append(i)
            seq_space.append(space)
            resp_lens.append(response.numel())
    input_ids = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
    total = input_ids.numel()
    if total >= 2**31:
        raise ValueError(f"a packed batch must hold fewer than 2**31 tokens for int32 cu_seqlens, got {total}")
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    cu_seqlens = torch.zeros(len(seq_lens) + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=cu_seqlens[1:])
    seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens)), lens)
    position_ids = torch.arange(total) - cu_seqlens[seq_ids]
    labels = torch.zeros_like(input_ids)
    labels[:-1] = input_ids[1:]
    labels[cu_seqlens[1:] - 1] = 0
    ctx = torch.tensor(ctx_lens, dtype=torch.int64)[seq_ids]
    loss_mask = (position_ids >= ctx - 1) & (position_ids < lens[seq_ids] - 1)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens.to(torch.int32),
        max_seqlen=max(seq_lens, default=0),
        labels=labels,
        loss_mask=loss_mask,
        masked_idx=loss_mask.nonzero()[:, 0],
        seq_ids=seq_ids,
        seq_sample=torch.tensor(seq_sample, dtype=torch.int64),
        seq_sample_host=tuple(seq_sample),
        seq_space=tuple(seq_space),
        seq_response_lens=tuple(resp_lens),
        num_samples=len(prompts),
    )


def pack(
    prompts: Sequence[TokenIds],
    responses: Sequence[TokenIds],
    spaces: str | Sequence[str] = "cond",
    prefix: TokenIds = DEFAULT_PREFIX,
) -> PackedBatch:
    """Pack samples into one varlen batch (on the CPU; move it with ``.to``).

    prompts, responses: one list entry per sample, each a list of non-negative ints or a 1-D int tensor.
    spaces: ``"cond"``, ``"marg"`` or ``"both"``, for all samples or one per sample.
    prefix: marginal context token ids (default ``(151644,)``); must be non-empty if any sample uses ``"marg"``.
    An empty list of samples gives an empty batch (T = S = 0).
    """
    return _pack(*_normalize(prompts, responses, spaces, prefix))


def unpack(batch: PackedBatch, values: torch.Tensor) -> dict[str, list[torch.Tensor | None]]:
    """Split per-masked-token values by space and sample (differentiable: views of ``values``).

    values: (M, ...) any dtype, one row per loss-masked token in packed order (e.g. log-probs).
    Returns {space: [ (len(response_i), ...) or None for each sample i ]}; a key is present only if some sequence
    of the batch is in that space, and a sample with no sequence in that space gets None.
    """
    if not isinstance(values, torch.Tensor) or values.dim() == 0:
        raise TypeError(f"values must be a tensor of at least 1 dim, got {type(values).__name__}")
    if values.shape[0] != batch.num_masked:
        raise ValueError(f"values must have {batch.num_masked} rows (loss-masked tokens), got {values.shape[0]}")
    out: dict[str, list[torch.Tensor | None]] = {}
    chunks = values.split(batch.seq_response_lens)
    for chunk, space, sample in zip(chunks, batch.seq_space, batch.seq_sample_host):
        out.setdefault(space, [None] * batch.num_samples)[sample] = chunk
    return dict(sorted(out.items(), key=lambda kv: SPACES.index(kv[0])))


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _first_fit_decreasing(
    order: list[int], lengths: Sequence[int], capacity: int, num_bins: int
) -> list[list[int]] | None:
    """First-fit decreasing into ``num_bins`` bins of ``capacity`` (``order``: longest first); None if it overflows.

    A max-tree over the bins' free space finds the first bin that fits in O(log num_bins).
    """
    size = 1 << max(0, (num_bins - 1).bit_length())
    free = [0] * size + [capacity] * num_bins + [0] * (size - num_bins)
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for i in order:
        if free[1] < lengths[i]:
            return None
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        bins[node - size].append(i)
        free[node] -= lengths[i]
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return bins


def split_micro_batches(lengths: Sequence[int], max_tokens: int, num_ranks: int = 1) -> list[list[list[int]]]:
    """Split samples into token-budget micro-batches, the same number on every data-parallel rank.

    lengths: packed length of each sample (all its sequences). Returns ``[rank][micro_batch] -> sample indices``
    (ascending). Every micro-batch holds at most ``max_tokens`` tokens. The micro-batch count ``k`` is the first-fit
    decreasing bin count rounded up to a multiple of ``num_ranks``; MULTIFIT then balances them (binary search for the
    smallest capacity at which first-fit decreasing still fits in ``k`` bins). Micro-batches are dealt to ranks in
    rounds, the largest of a round to the least-loaded rank, so rank token totals differ by at most the largest
    minus the smallest micro-batch load. A micro-batch is empty (``[]``) only when there are fewer samples than
    micro-batches (e.g. fewer samples than ranks); every rank must still step through it. No samples: no micro-batches.
    """
    _check_positive_int(max_tokens, "max_tokens")
    _check_positive_int(num_ranks, "num_ranks")
    for i, length in enumerate(lengths):
        _check_positive_int(length, f"lengths[{i}]")
        if length > max_tokens:
            raise ValueError(f"sample {i} has {length} packed tokens, more than max_tokens={max_tokens}")
    n = len(lengths)
    if n == 0:
        return [[] for _ in range(num_ranks)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    greedy = _first_fit_decreasing(order, lengths, max_tokens, n)
    assert greedy is not None
    num_bins = -(-sum(1 for b in greedy if b) // num_ranks) * num_ranks
    bins = greedy[:num_bins] + [[] for _ in range(num_bins - n)]
    lo, hi = max(-(-sum(lengths) // num_bins), lengths[order[0]]), max_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        tighter = _first_fit_decreasing(order, lengths, mid, num_bins)
        if tighter is None:
            lo = mid + 1
        else:
            bins, hi = tighter, mid
    loads = [sum(lengths[i] for i in b) for b in bins]
    for empty in [b for b in range(num_bins) if not bins[b]]:
        donors = [b for b in range(num_bins) if len(bins[b]) > 1]
        if not donors:
            break
        donor = max(donors, key=lambda b: (loads[b], -b))
        moved = bins[donor].pop()
        bins[empty].append(moved)
        loads[donor] -= lengths[moved]
        loads[empty] += lengths[moved]
    by_load = sorted(range(num_bins), key=lambda b: (-loads[b], b))
    ranks: list[list[list[int]]] = [[] for _ in range(num_ranks)]
    totals = [0] * num_ranks
    for start in range(0, num_bins, num_ranks):
        for b, r in zip(by_load[start : start + num_ranks], sorted(range(num_ranks), key=lambda r: (totals[r], r))):
            ranks[r].append(sorted(bins[b]))
            totals[r] += loads[b]
    return ranks


def build_micro_batches(
    prompts: Sequence[TokenIds],
    responses: Sequence[TokenIds],
    spaces: str | Sequence[str],
    max_tokens: int,
    prefix: TokenIds = DEFAULT_PREFIX,
    num_ranks: int = 1,
    rank: int = 0,
) -> list[tuple[list[int], PackedBatch]]:
    """Pack the micro-batches of ``rank`` (see ``split_micro_batches``): a list of (sample indices, PackedBatch).

    Sample indices refer to ``prompts``; inside each PackedBatch, ``seq_sample`` indexes that micro-batch's list.
    """
    _check_positive_int(num_ranks, "num_ranks")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_ranks:
        raise ValueError(f"rank must be an int in [0, {num_ranks}), got {rank!r}")
    prompt_ids, response_ids, sample_spaces, prefix_ids = _normalize(prompts, responses, spaces, prefix)
    lengths = [
        sum((p.numel() if s == "cond" else prefix_ids.numel()) + r.numel() for s in used)
        for p, r, used in zip(prompt_ids, response_ids, sample_spaces)
    ]
    out = []
    for idx in split_micro_batches(lengths, max_tokens, num_ranks)[rank]:
        batch = _pack(
            [prompt_ids[i] for i in idx], [response_ids[i] for i in idx], [sample_spaces[i] for i in idx], prefix_ids
        )
        out.append((idx, batch))
    return out
