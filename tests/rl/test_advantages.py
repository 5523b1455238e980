"""Advantage estimators against hand-computed values and float64 references; filters; token broadcast."""

from __future__ import annotations

import math

import pytest
import torch

from dsrl_fast.rl.advantages import ESTIMATORS, broadcast_to_tokens, compute_advantages, gae, sample_filter, whiten


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# One group of 4 rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3).
R = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
S = math.sqrt(1.0 / 3.0)


def test_grpo_hand_computed():
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (S + 1e-6)
    torch.testing.assert_close(compute_advantages(R, "grpo"), expected)


@pytest.mark.parametrize("estimator", ["dr_grpo", "marginal"])
def test_mean_baseline_hand_computed(estimator):
    torch.testing.assert_close(compute_advantages(R, estimator), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_rloo_hand_computed():
    # r_0 = 1, others [0, 0, 1]: 1 - 1/3; r_1 = 0, others [1, 0, 1]: 0 - 2/3
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]])
    torch.testing.assert_close(compute_advantages(R, "rloo"), expected)


def test_reinforce_pp_hand_computed():
    # batch [1, 0, 0, 0]: mean 0.25, unbiased var 0.25; groups are ignored
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    expected = (rewards - 0.25) / math.sqrt(0.25 + 1e-8)
    torch.testing.assert_close(compute_advantages(rewards, "reinforce_pp"), expected)
    flat = compute_advantages(rewards.reshape(-1), "reinforce_pp")
    torch.testing.assert_close(flat, expected.reshape(-1))


def test_reinforce_pp_token_weighted_matches_verl_whitening():
    """verl whitens per-token returns over the response mask; token_counts reproduce it per sample."""
    rewards = torch.rand(7, dtype=torch.float64)
    lengths = torch.tensor([3, 1, 5, 2, 8, 1, 4])
    tokens = rewards.repeat_interleave(lengths)  # outcome reward, gamma 1: every token's return is r
    mean = tokens.mean()
    var = tokens.var(unbiased=True)
    expected = (rewards - mean) * torch.rsqrt(var + 1e-8)
    torch.testing.assert_close(compute_advantages(rewards, "reinforce_pp", token_counts=lengths), expected)


def test_random_groups_against_float64_reference():
    """Shuffled, unequal groups (sizes 1..6) as (N,) + group_ids vs a per-group float64 loop."""
    sizes = [3, 1, 6, 2, 5, 4]
    group_ids = torch.repeat_interleave(torch.tensor([40, 7, 13, 2, 99, 5]), torch.tensor(sizes))
    perm = torch.randperm(group_ids.numel())
    group_ids = group_ids[perm]
    rewards = torch.randn(group_ids.numel()) * 3 + 1
    for estimator in ("grpo", "dr_grpo", "marginal", "rloo"):
        got = compute_advantages(rewards, estimator, group_ids=group_ids)
        expected = torch.empty_like(rewards, dtype=torch.float64)
        for g in group_ids.unique():
            idx = (group_ids == g).nonzero().squeeze(1)
            r = rewards[idx].double()
            n = r.numel()
            if n == 1:
                expected[idx] = 0.0
            elif estimator == "grpo":
                expected[idx] = (r - r.mean()) / (r.std() + 1e-6)
            elif estimator == "rloo":
                expected[idx] = r - (r.sum() - r) / (n - 1)
            else:
                expected[idx] = r - r.mean()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "marginal", "rloo"])
def test_singleton_groups_get_zero(estimator):
    rewards = torch.tensor([0.7, 1.0, 0.0, 3.0])
    group_ids = torch.tensor([0, 1, 1, 2])
    adv = compute_advantages(rewards, estimator, group_ids=group_ids)
    assert adv[0] == 0 and adv[3] == 0
    assert adv[1] > 0 > adv[2]
    assert torch.equal(compute_advantages(torch.tensor([[5.0]]), estimator), torch.zeros(1, 1))


def test_reinforce_pp_single_sample_is_zero():
    assert torch.equal(compute_advantages(torch.tensor([[1.0]]), "reinforce_pp"), torch.zeros(1, 1))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_constant_rewards_give_zero(estimator):
    adv = compute_advantages(torch.ones(3, 8), estimator)
    assert torch.isfinite(adv).all() and adv.abs().max() < 1e-5


def test_2d_and_1d_agree():
    rewards = torch.randn(5, 7)
    group_ids = torch.arange(5).repeat_interleave(7)
    for estimator in ESTIMATORS:
        two_d = compute_advantages(rewards, estimator)
        one_d = compute_advantages(rewards.reshape(-1), estimator, group_ids=group_ids)
        assert two_d.shape == (5, 7)
        torch.testing.assert_close(two_d.reshape(-1), one_d)


def test_float64_kept():
    assert compute_advantages(torch.rand(2, 3, dtype=torch.float64), "grpo").dtype == torch.float64


def test_validation():
    with pytest.raises(TypeError, match="floating-point tensor"):
        compute_advantages(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="estimator must be one of"):
        compute_advantages(R, "ppo")
    with pytest.raises(ValueError, match="group_ids must be given"):
        compute_advantages(torch.ones(4), "grpo")
    with pytest.raises(ValueError, match="group_ids must be None when rewards is 2-D"):
        compute_advantages(R, "grpo", group_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids must be an integer tensor of shape"):
        compute_advantages(torch.ones(4), "grpo", group_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        compute_advantages(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="must not be empty"):
        compute_advantages(torch.ones(0, 4))
    with pytest.raises(ValueError, match="token_counts is only for 'reinforce_pp'"):
        compute_advantages(R, "grpo", token_counts=torch.ones(1, 4))


def test_sample_filter():
    adv = torch.tensor([0.5, -0.2, 0.0, -1.0, 2.0])
    assert sample_filter(adv, "all").tolist() == [True] * 5
    assert sample_filter(adv, "negative").tolist() == [False, True, False, True, False]
    assert sample_filter(adv, "positive").tolist() == [True, False, False, False, True]
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_filter(adv, "nsr")


def test_broadcast_to_tokens():
    per_sample = torch.tensor([10.0, -1.0, 3.0])
    ids = torch.tensor([-1, -1, 0, 0, 0, -1, 2, 2, 1])
    out = broadcast_to_tokens(per_sample, ids)
    assert out.tolist() == [0, 0, 10, 10, 10, 0, 3, 3, -1]
    mask = broadcast_to_tokens(sample_filter(per_sample, "negative"), ids, fill=False)
    assert mask.dtype == torch.bool and mask.tolist() == [False] * 8 + [True]
    assert broadcast_to_tokens(per_sample, torch.tensor([], dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError, match="sample_ids must be < 3"):
        broadcast_to_tokens(per_sample, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="sample_ids must be a 1-D integer tensor"):
        broadcast_to_tokens(per_sample, torch.tensor([0.0]))


def _two_rank_run(fn, shards):
    """Run fn(shard, reduce_sum) on two threads whose reduce_sum adds the tensors both threads pass (a stand-in for
    an all-reduce over two ranks); returns both results."""
    import threading

    barrier = threading.Barrier(2)
    slots: list = [None, None]
    results: list = [None, None]

    def make_reduce(rank):
        def reduce_sum(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return reduce_sum

    def work(rank):
        results[rank] = fn(shards[rank], make_reduce(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_batch_estimators_whiten_over_the_global_batch(estimator):
    """Two ranks holding 3 and 2 whole groups with reduce_sum get exactly the one-process advantages."""
    rewards = torch.randint(0, 2, (5, 4)).double()
    rewards[:, 0] = 1.0
    counts = torch.randint(1, 9, (5, 4))
    whole = compute_advantages(rewards, estimator, token_counts=counts)
    shards = [(rewards[:3], counts[:3]), (rewards[3:], counts[3:])]
    got = _two_rank_run(lambda s, red: compute_advantages(s[0], estimator, token_counts=s[1], reduce_sum=red), shards)
    torch.testing.assert_close(torch.cat(got), whole, rtol=1e-12, atol=1e-12)
    local = torch.cat([compute_advantages(r, estimator, token_counts=c) for r, c in shards])
    assert (local - whole).abs().max() > 1e-3, "per-rank whitening must differ here, or the test proves nothing"


def test_reinforce_pp_baseline_matches_verl_formula():
    """verl: scores - group mean, broadcast to tokens, whitened over the response mask (float64 loop)."""
    rewards = torch.rand(4, 3, dtype=torch.float64)
    lengths = torch.randint(1, 7, (4, 3))
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    tokens = torch.cat([centered.reshape(-1)[i].repeat(int(n)) for i, n in enumerate(lengths.reshape(-1))])
    expected = (centered - tokens.mean()) / torch.sqrt(tokens.var(unbiased=True) + 1e-8)
    got = compute_advantages(rewards, "reinforce_pp_baseline", token_counts=lengths)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _gae_reference(rewards, values, lengths, gamma, lam):
    adv = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_against_a_float64_loop(gamma, lam):
    lengths = [7, 1, 4, 13, 2]
    mask = torch.zeros(5, 13, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    rewards = torch.randn(5, 13, dtype=torch.float64)
    values = torch.randn(5, 13, dtype=torch.float64)
    garbage = torch.full_like(rewards, 1e6)  # padding content must not leak in
    out = gae(torch.where(mask, rewards, garbage), torch.where(mask, values, garbage), mask, gamma, lam)
    expected = _gae_reference(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(out.advantages, torch.where(mask, expected, 0.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.returns, torch.where(mask, expected + values, 0.0), rtol=1e-12, atol=1e-12)


def test_gae_with_zero_values_and_lambda_one_is_the_return_to_go():
    rewards = torch.tensor([[0.0, -0.1, 1.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    torch.testing.assert_close(out.advantages, torch.tensor([[0.9, 0.9, 1.0, 0.0]]))


def test_whiten_global_equals_whole_and_validation():
    x = torch.randn(6, 5, dtype=torch.float64)
    w = (torch.rand(6, 5) > 0.3).double()
    whole = whiten(x, w)
    got = _two_rank_run(lambda s, red: whiten(s[0], s[1], red), [(x[:2], w[:2]), (x[2:], w[2:])])
    torch.testing.assert_close(torch.cat(got) * w, whole * w, rtol=1e-12, atol=1e-12)
    kept = x[w > 0]
    torch.testing.assert_close(whole[w > 0], (kept - kept.mean()) / torch.sqrt(kept.var() + 1e-8))
    with pytest.raises(ValueError, match="weights must have shape"):
        whiten(x, w[:2])
    with pytest.raises(ValueError, match="gamma must be a number in"):
        gae(x, x, w > 0, gamma=1.5)
    with pytest.raises(ValueError, match="values and mask"):
        gae(x, x[:2], w > 0)
