import math
import random
import time

import pytest
import torch

from dsrl_fast.data.packing import DEFAULT_PREFIX, PackedBatch, build_micro_batches, pack, split_micro_batches, unpack

PROMPT_IDS = (0, 1000)  # prompts and responses use disjoint id ranges, so a leaked prompt token is visible
RESPONSE_IDS = (1000, 2000)


def _random_samples(rng: random.Random, n: int, max_prompt: int = 9, max_response: int = 12):
    prompts = [[rng.randrange(*PROMPT_IDS) for _ in range(rng.randint(1, max_prompt))] for _ in range(n)]
    lens = [1 if i % 3 == 0 else rng.randint(1, max_response) for i in range(n)]
    responses = [[rng.randrange(*RESPONSE_IDS) for _ in range(k)] for k in lens]
    spaces = [rng.choice(["cond", "marg", "both"]) for _ in range(n)]
    return prompts, responses, spaces


def _reference(prompts, responses, spaces, prefix):
    """Per-sequence hand-built layout: (sample, space, input_ids, labels, loss_mask)."""
    seqs = []
    for i, (prompt, response, space) in enumerate(zip(prompts, responses, spaces)):
        for s in ("cond", "marg"):
            if space in (s, "both"):
                ctx = list(prompt) if s == "cond" else list(prefix)
                ids = ctx + list(response)
                labels = ids[1:] + [0]
                mask = [False] * (len(ctx) - 1) + [True] * len(response) + [False]
                seqs.append((i, s, ids, labels, mask))
    return seqs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix", [DEFAULT_PREFIX, (1,), (7, 8, 9)])
def test_fields_match_reference(seed: int, prefix: tuple[int, ...]) -> None:
    rng = random.Random(seed)
    n = 1 if seed == 0 else rng.randint(2, 9)
    prompts, responses, spaces = _random_samples(rng, n)
    batch = pack(prompts, responses, spaces, prefix)
    ref = _reference(prompts, responses, spaces, prefix)

    lens = [len(ids) for _, _, ids, _, _ in ref]
    assert batch.input_ids.dtype == batch.position_ids.dtype == batch.labels.dtype == torch.int64
    assert batch.cu_seqlens.dtype == torch.int32 and batch.loss_mask.dtype == torch.bool
    assert batch.cu_seqlens.tolist() == [0] + list(torch.tensor(lens).cumsum(0).tolist())
    assert batch.max_seqlen == max(lens)
    assert batch.input_ids.tolist() == [t for _, _, ids, _, _ in ref for t in ids]
    assert batch.position_ids.tolist() == [p for k in lens for p in range(k)]
    assert batch.labels.tolist() == [t for _, _, _, labels, _ in ref for t in labels]
    assert batch.loss_mask.tolist() == [m for _, _, _, _, mask in ref for m in mask]
    assert batch.seq_ids.tolist() == [s for s, k in enumerate(lens) for _ in range(k)]
    assert batch.seq_sample.tolist() == list(batch.seq_sample_host) == [i for i, _, _, _, _ in ref]
    assert batch.seq_space == tuple(s for _, s, _, _, _ in ref)
    assert batch.masked_indices().tolist() == batch.loss_mask.nonzero()[:, 0].tolist()
    assert batch.num_samples == n and batch.num_tokens == sum(lens)
    for s, (i, _, _, _, _) in enumerate(ref):
        in_seq = batch.seq_ids == s
        assert int(batch.loss_mask[in_seq].sum()) == len(responses[i]) == batch.seq_response_lens[s]
        assert batch.labels[in_seq & batch.loss_mask].tolist() == responses[i]


def test_marginal_sequences_hold_prefix_and_response_only() -> None:
    rng = random.Random(1)
    prompts, responses, _ = _random_samples(rng, 6)
    batch = pack(prompts, responses, "both", prefix=(5, 6))
    for s, space in enumerate(batch.seq_space):
        ids = batch.input_ids[batch.seq_ids == s].tolist()
        i = batch.seq_sample_host[s]
        assert ids == ([5, 6] + responses[i] if space == "marg" else prompts[i] + responses[i])
        if space == "marg":
            assert not any(PROMPT_IDS[0] <= t < PROMPT_IDS[1] and t not in (5, 6) for t in ids)


def test_tensor_inputs_match_list_inputs() -> None:
    rng = random.Random(2)
    prompts, responses, spaces = _random_samples(rng, 5)
    as_lists = pack(prompts, responses, spaces)
    as_tensors = pack(
        [torch.tensor(p, dtype=torch.int32) for p in prompts],
        [torch.tensor(r) for r in responses],
        spaces,
        torch.tensor(DEFAULT_PREFIX),
    )
    for name in ("input_ids", "position_ids", "cu_seqlens", "labels", "loss_mask", "seq_ids", "seq_sample"):
        assert torch.equal(getattr(as_lists, name), getattr(as_tensors, name)), name


def test_empty_prompt_allowed_for_marginal_only_and_empty_batch() -> None:
    batch = pack([[]], [[1001, 1002]], "marg")
    assert batch.input_ids.tolist() == [DEFAULT_PREFIX[0], 1001, 1002]
    assert batch.loss_mask.tolist() == [True, True, False]
    empty = pack([], [], "cond")
    assert empty.num_tokens == 0 and empty.cu_seqlens.tolist() == [0] and empty.max_seqlen == 0
    assert unpack(empty, torch.empty(0)) == {}


def test_to_moves_every_tensor() -> None:
    batch = pack([[1, 2]], [[1001]], "both").to("meta")
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            assert value.device.type == "meta", name
    assert batch.seq_space == ("cond", "marg") and batch.max_seqlen == 3


@pytest.mark.parametrize("seed", range(4))
def test_unpack_round_trip_and_gradient(seed: int) -> None:
    rng = random.Random(seed)
    prompts, responses, spaces = _random_samples(rng, rng.randint(1, 8))
    spaces[0] = "cond"
    batch = pack(prompts, responses, spaces)
    labels = batch.labels[batch.masked_indices()].double().requires_grad_(True)
    out = unpack(batch, labels)
    used = {s for sp in spaces for s in (("cond", "marg") if sp == "both" else (sp,))}
    assert set(out) == used and list(out) == [s for s in ("cond", "marg") if s in used]
    weights = {}
    for space, per_sample in out.items():
        assert len(per_sample) == len(prompts)
        for i, values in enumerate(per_sample):
            if spaces[i] not in (space, "both"):
                assert values is None
                continue
            assert values.tolist() == responses[i]
            weights[space, i] = torch.randn(len(responses[i]), dtype=torch.float64)
    loss = sum((out[s][i] * w).sum() for (s, i), w in weights.items())
    loss.backward()
    expected = torch.cat([weights[batch.seq_space[s], batch.seq_sample_host[s]] for s in range(len(batch.seq_space))])
    torch.testing.assert_close(labels.grad, expected, rtol=0, atol=0)

    rows = unpack(batch, torch.arange(batch.num_masked * 3).view(-1, 3))
    first = next(v for v in rows[spaces[0]] if v is not None)
    assert first.shape == (len(responses[0]), 3) and first[0].tolist() == [0, 1, 2]


def test_unpack_rejects_wrong_row_count() -> None:
    batch = pack([[1]], [[1001, 1002]], "both")
    with pytest.raises(ValueError, match="values must have 4 rows"):
        unpack(batch, torch.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"prompts": [[1], [2, -3]], "responses": [[1], [2]]}, ValueError, r"prompts\[1\].*non-negative.*-3"),
        ({"prompts": [[1]], "responses": [[1.5]]}, TypeError, r"responses\[0\].*integer"),
        ({"prompts": [[1]], "responses": [torch.tensor([True])]}, TypeError, r"responses\[0\].*dtype"),
        ({"prompts": [torch.ones(2, 2, dtype=torch.long)], "responses": [[1]]}, ValueError, r"prompts\[0\].*1-D"),
        ({"prompts": [[1], [2]], "responses": [[1]]}, ValueError, r"prompts and responses.*2 and 1"),
        ({"prompts": [[1]] * 3, "responses": [[1], [2], []]}, ValueError, r"responses\[2\] must be non-empty"),
        ({"prompts": [[1]], "responses": [[1]], "spaces": "prior"}, ValueError, r"spaces\[0\].*'prior'"),
        ({"prompts": [[1]], "responses": [[1]], "spaces": ["cond", "marg"]}, ValueError, r"spaces.*\(1\), got 2"),
        (
            {"prompts": [[1]], "responses": [[1]], "spaces": "both", "prefix": ()},
            ValueError,
            r"prefix must be non-empty",
        ),
        ({"prompts": [[]], "responses": [[1]], "spaces": "cond"}, ValueError, r"prompts\[0\] must be non-empty"),
        ({"prompts": "abc", "responses": [[1]]}, TypeError, r"prompts must be a list"),
        ({"prompts": [[1]], "responses": [[1]], "prefix": [-1]}, ValueError, r"prefix.*non-negative"),
    ],
)
def test_pack_validation_names_the_argument(kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        pack(**kwargs)


def test_empty_prefix_is_fine_without_marginal_sequences() -> None:
    assert pack([[1]], [[1001]], "cond", prefix=()).input_ids.tolist() == [1, 1001]


def _check_split(lengths: list[int], max_tokens: int, num_ranks: int) -> list[list[list[int]]]:
    ranks = split_micro_batches(lengths, max_tokens, num_ranks)
    assert len(ranks) == num_ranks
    counts = {len(r) for r in ranks}
    assert len(counts) == 1
    flat = [i for r in ranks for mb in r for i in mb]
    assert sorted(flat) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in mb) for r in ranks for mb in r]
    assert max(loads) <= max_tokens
    assert all(mb == sorted(mb) for r in ranks for mb in r)
    if len(lengths) >= len(loads):
        assert min(loads) > 0
    totals = [sum(lengths[i] for mb in r for i in mb) for r in ranks]
    by_load = sorted(loads, reverse=True)
    rounds = [by_load[k : k + num_ranks] for k in range(0, len(by_load), num_ranks)]
    assert max(totals) - min(totals) <= max(r[0] - r[-1] for r in rounds)  # the documented bound
    assert len(loads) == max(1, math.ceil(_ffd_bin_count(lengths, max_tokens) / num_ranks)) * num_ranks
    return ranks


def _ffd_bin_count(lengths: list[int], max_tokens: int) -> int:
    free: list[int] = []
    for length in sorted(lengths, reverse=True):
        fit = next((b for b, room in enumerate(free) if room >= length), None)
        if fit is None:
            free.append(max_tokens - length)
        else:
            free[fit] -= length
    return len(free)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("max_tokens", "num_ranks"), [(9300, 1), (16384, 4), (40000, 8), (9300, 3)])
def test_split_micro_batches_budget_cover_balance(seed: int, max_tokens: int, num_ranks: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 2, 7, 64, 300])
    lengths = [rng.randint(1, 1024) + rng.choice([1, 2, rng.randint(1, 8192)]) for _ in range(n)]
    ranks = _check_split(lengths, max_tokens, num_ranks)
    assert ranks == split_micro_batches(lengths, max_tokens, num_ranks)


def test_split_micro_batches_edge_cases() -> None:
    assert split_micro_batches([], 10, 3) == [[], [], []]
    assert split_micro_batches([5], 5, 2) in ([[[0]], [[]]], [[[]], [[0]]])
    assert split_micro_batches([3, 3, 3, 3], 6) == [[[0, 1], [2, 3]]]
    _check_split([6] * 40, 10, 4)
    assert _check_split([10, 10, 1, 1], 20, 4) == [[[0]], [[1]], [[2]], [[3]]]  # no empty micro-batch
    assert _check_split([10, 9, 8, 7, 6, 5, 4, 3], 10, 2) == [[[0], [4, 6], [5]], [[3, 7], [1], [2]]]
    _check_split([1] * 500 + [8192] * 3, 8192, 2)


def test_split_micro_batches_is_fast_for_thousands() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(50, 1024) + rng.randint(1, 8192) for _ in range(4096)]
    start = time.perf_counter()
    split_micro_batches(lengths, 32768, 8)
    assert time.perf_counter() - start < 5.0
    ranks = _check_split(lengths, 32768, 8)
    loads = [sum(lengths[i] for i in mb) for r in ranks for mb in r]
    assert max(loads) - min(loads) < 0.05 * 32768  # balanced micro-batches, not first-fit leftovers


def test_split_micro_batches_errors() -> None:
    with pytest.raises(ValueError, match=r"sample 2 has 101 packed tokens, more than max_tokens=100"):
        split_micro_batches([5, 100, 101], 100)
    with pytest.raises(ValueError, match=r"max_tokens must be a positive int, got 0"):
        split_micro_batches([1], 0)
    with pytest.raises(ValueError, match=r"num_ranks must be a positive int, got 0"):
        split_micro_batches([1], 10, num_ranks=0)
    with pytest.raises(ValueError, match=r"lengths\[1\] must be a positive int, got 0"):
        split_micro_batches([1, 0], 10)


def test_build_micro_batches_matches_pack_of_each_subset() -> None:
    rng = random.Random(3)
    prompts, responses, spaces = _random_samples(rng, 40, max_prompt=20, max_response=40)
    prefix = (3, 4)
    lengths = [
        (len(p) + len(r) if s != "marg" else 0) + (len(prefix) + len(r) if s != "cond" else 0)
        for p, r, s in zip(prompts, responses, spaces)
    ]
    seen = []
    counts = set()
    for rank in range(3):
        micro = build_micro_batches(prompts, responses, spaces, 120, prefix=prefix, num_ranks=3, rank=rank)
        counts.add(len(micro))
        for idx, batch in micro:
            assert isinstance(batch, PackedBatch) and batch.num_tokens == sum(lengths[i] for i in idx) <= 120
            sub = pack([prompts[i] for i in idx], [responses[i] for i in idx], [spaces[i] for i in idx], prefix)
            assert torch.equal(batch.input_ids, sub.input_ids) and torch.equal(batch.loss_mask, sub.loss_mask)
            seen += idx
    assert sorted(seen) == list(range(40)) and len(counts) == 1
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 3\), got 3"):
        build_micro_batches(prompts, responses, spaces, 120, num_ranks=3, rank=3)
    with pytest.raises(ValueError, match=r"more than max_tokens=20"):
        build_micro_batches(prompts, responses, spaces, 20)
