"""Several updates per rollout batch (mini-batches, epochs, old log-probs), PPO's critic and GAE, the k1 KL penalty
in the reward, and the marginal-phase guard, on a tiny Qwen3 with synthetic rollouts (one process)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the RL step runs a transformers model (the train extra)")

from dsrl_fast.model.packed import prepare_packed_model  # noqa: E402
from dsrl_fast.rollout.base import Rollout  # noqa: E402
from dsrl_fast.rl.algorithms import phase_for_step  # noqa: E402
from dsrl_fast.train import batch_update  # noqa: E402
from dsrl_fast.train.batch_update import (  # noqa: E402
    CriticSetup,
    Packing,
    UpdateOptions,
    mini_batch_groups,
    policy_logprob_fn,
    run_batch,
)
from dsrl_fast.rl.config import GuardConfig  # noqa: E402
from dsrl_fast.train.critic import CriticModule, ValueLossConfig, build_critic_model, value_loss  # noqa: E402
from dsrl_fast.rl.guard import GuardSignals, MarginalGuard, guard_signals  # noqa: E402
from dsrl_fast.train.rl_step import StepSamples, run_update  # noqa: E402
from dsrl_fast.train.updaters import PolicyModule, TorchUpdater  # noqa: E402
from tests.model.test_model import tiny_model  # noqa: E402
from tests.train.test_train_step import DEFAULTS, random_samples  # noqa: E402

CPU = torch.device("cpu")
PREFIX = (7,)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    return prepare_packed_model(tiny_model("qwen3"), attention_backend="torch")


class RecordingUpdater(TorchUpdater):
    """A real AdamW updater that keeps a copy of the gradient of every optimizer step."""

    def __init__(self, module: torch.nn.Module, lr: float = 1e-2):
        super().__init__(module, lr=lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=1e9)
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self, lr: float) -> float:
        self.grads.append({n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None})
        return super().step(lr)


def _policy(base: torch.nn.Module, lr: float = 1e-2) -> RecordingUpdater:
    return RecordingUpdater(PolicyModule(copy.deepcopy(base), impl="torch"), lr=lr)


def _batch(updater: Any, samples: StepSamples, phase: Any, options: UpdateOptions, **kwargs: Any) -> Any:
    packing = Packing(PREFIX, kwargs.pop("max_tokens", 40), CPU)
    if kwargs.pop("marginal_logprob", False):
        options = dataclasses.replace(options, marginal_logprob=True)
    return run_batch(updater, samples, phase, step=kwargs.pop("step", 0), lr=kwargs.pop("lr", 1e-2), packing=packing,
                     options=options, **kwargs)


def _assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=1e-8, msg=name)


@pytest.mark.parametrize("algo", ["grpo", "nsr_prerl"])
def test_more_epochs_give_the_same_first_update_gradient(base: torch.nn.Module, algo: str) -> None:
    """epochs > 1 recomputes the old log-probs at the rollout weights: its first update is the on-policy one."""
    samples = random_samples()
    phase = phase_for_step(0, algo=algo, **DEFAULTS)
    one, three = _policy(base), _policy(base)
    r1 = _batch(one, samples, phase, UpdateOptions())
    r3 = _batch(three, samples, phase, UpdateOptions(epochs=3))
    assert len(one.grads) == 1 and len(three.grads) == 3 and r3.metrics["updates"] == 3
    _assert_same_grads(three.grads[0], one.grads[0])
    # the later updates are off-policy: the policy moved, so their gradients differ and some ratios clip
    assert max((three.grads[2][n] - one.grads[0][n]).abs().max() for n in one.grads[0]) > 1e-6
    assert r3.update.clip_frac > 0 and r1.update.clip_frac == 0


def test_mini_batches_step_on_whole_groups_with_their_own_normalization(base: torch.nn.Module) -> None:
    """mini_batches=3 over 3 groups: update k is the on-policy update of group k alone (at the weights it finds)."""
    samples = random_samples()
    samples.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # every group mixed
    phase = phase_for_step(5, algo="dsrl", **DEFAULTS)  # grpo
    assert mini_batch_groups(samples.group_ids, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert mini_batch_groups(samples.group_ids, 2) == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    with pytest.raises(ValueError, match="mini_batches must be <= the 3 prompt groups"):
        mini_batch_groups(samples.group_ids, 4)
    split = _policy(base)
    result = _batch(split, samples, phase, UpdateOptions(mini_batches=3))
    assert len(split.grads) == 3 and result.metrics["updates"] == 3
    alone = _policy(base)
    first = StepSamples(samples.prompt_ids[:4], samples.response_ids[:4], samples.sampler_logprobs[:4],
                        samples.rewards[:4], samples.group_ids[:4])
    _batch(alone, first, phase, UpdateOptions())
    _assert_same_grads(split.grads[0], alone.grads[0])


def test_sampler_old_logprobs_make_the_ratio_off_policy(base: torch.nn.Module) -> None:
    """With old_logprobs="sampler" the ratio is π / π_sampler: log-probs far from the policy's clip every token."""
    samples = random_samples()
    phase = phase_for_step(5, algo="dsrl", **DEFAULTS)
    model = copy.deepcopy(base)
    score = policy_logprob_fn(model, 1.0)
    with torch.no_grad():
        true = [score(b).tolist() for b in [_cond_batch(samples, i) for i in range(len(samples.response_ids))]]
    exact = copy.copy(samples)
    exact.sampler_logprobs = true
    far = copy.copy(samples)
    far.sampler_logprobs = [[lp - 1.0 for lp in row] for row in true]  # ratio e ≈ 2.7 > 1.2 everywhere
    on_policy = _batch(_policy(base), exact, phase, UpdateOptions(old_logprobs="sampler")).update
    off_policy = _batch(_policy(base), far, phase, UpdateOptions(old_logprobs="sampler")).update
    assert on_policy.clip_frac == 0 and on_policy.logprob_drift < 1e-5
    assert off_policy.logprob_drift == pytest.approx(1.0, abs=1e-4)
    # tokens with A > 0 clip (ratio e > 1.2); tokens with A < 0 have no upper clip: about the positive share
    positive = float((torch.tensor([len(r) for r in samples.response_ids]) * (samples.rewards > 0)).sum())
    assert 0 < off_policy.clip_frac and off_policy.clip_frac == pytest.approx(
        positive / off_policy.trained_tokens, abs=1e-6)


def _cond_batch(samples: StepSamples, i: int) -> Any:
    from dsrl_fast.data.packing import build_micro_batches

    ((_, batch),) = build_micro_batches([samples.prompt_ids[i]], [samples.response_ids[i]], "cond", 64)
    return batch


def _critic(base: torch.nn.Module, lr: float = 3e-3, clip: float | None = None, warmup: int = 0) -> CriticSetup:
    model = build_critic_model(base)
    updater = TorchUpdater(CriticModule(model), lr=lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,  # type: ignore[arg-type]
                           grad_clip=1.0)
    return CriticSetup(updater, lr, clip, warmup)


def test_value_loss_against_float64() -> None:
    torch.manual_seed(3)
    v, old, ret = (torch.randn(37, dtype=torch.float64) for _ in range(3))
    v.requires_grad_(True)
    loss, metrics = value_loss(v.float(), ret.float(), old.float(), ValueLossConfig(clip=0.2, norm_tokens=50))
    clipped = old + (v - old).clamp(-0.2, 0.2)
    want = 0.5 * torch.maximum((v - ret) ** 2, (clipped - ret) ** 2).sum() / 50
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-5 * abs(float(want.detach()))
    assert metrics["value_clip_frac"] == ((clipped - ret) ** 2 > (v - ret) ** 2).sum()
    unclipped, _ = value_loss(v.float(), ret.float(), None, ValueLossConfig(clip=0.2, norm_tokens=50))
    assert abs(float(unclipped.detach()) - float(0.5 * ((v - ret) ** 2).sum().detach() / 50)) < 1e-5


def test_ppo_trains_its_critic_and_uses_token_advantages(base: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated PPO batches on fixed rollouts: the critic's value loss falls and explained variance rises; the
    policy's token advantages are whitened GAE (mean 0 over the batch's tokens)."""
    samples = random_samples()
    phase = phase_for_step(0, algo="ppo", **DEFAULTS)
    assert phase.estimator == "gae"
    critic = _critic(base, lr=1e-2)
    policy = _policy(base, lr=1e-4)
    options = UpdateOptions(epochs=2, mini_batches=3, lam=0.95)
    seen = []
    captured: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        captured.append(kwargs.get("token_advantages"))
        return run_update(*args, **kwargs)

    monkeypatch.setattr(batch_update, "run_update", spy)
    for step in range(6):
        result = run_batch(policy, samples, phase, step=step, lr=1e-4, packing=Packing(PREFIX, 40, CPU),
                           options=options, critic=critic)
        seen.append(result.metrics)
    assert all(m["updates"] == 6 for m in seen)
    assert seen[-1]["value_loss"] < 0.5 * seen[0]["value_loss"], [m["value_loss"] for m in seen]
    assert seen[-1]["explained_variance"] > seen[1]["explained_variance"] + 0.1, [m["explained_variance"] for m in seen]
    first = torch.cat([t for chunk in captured[:3] for t in chunk])  # the three mini-batches of the first epoch
    assert abs(float(first.mean())) < 1e-5 and abs(float(first.std()) - 1) < 0.05
    with pytest.raises(ValueError, match="needs a critic"):
        _batch(_policy(base), samples, phase, UpdateOptions())


def test_critic_warmup_freezes_the_policy(base: torch.nn.Module) -> None:
    samples = random_samples()
    phase = phase_for_step(0, algo="ppo", **DEFAULTS)
    policy = _policy(base)
    result = _batch(policy, samples, phase, UpdateOptions(), critic=_critic(base, warmup=2), step=1)
    assert not result.update.stepped and not policy.grads and "critic warm-up" in result.skip_reason
    assert result.metrics["value_loss"] > 0


def test_kl_in_reward(base: torch.nn.Module) -> None:
    """A reference equal to the policy adds nothing; a shifted reference lowers every token's reward by β·k1."""
    samples = random_samples()
    for algo in ("rloo", "reinforce_pp"):
        phase = phase_for_step(0, algo=algo, **DEFAULTS)
        same = policy_logprob_fn(copy.deepcopy(base), 1.0)
        plain = _batch(_policy(base), samples, phase, UpdateOptions())
        zero_kl = _batch(_policy(base), samples, phase, UpdateOptions(kl_in_reward=0.5), ref_logprobs_fn=same)
        assert abs(zero_kl.metrics["reward_kl"]) < 1e-6
        torch.testing.assert_close(zero_kl.advantages, plain.advantages, rtol=1e-4, atol=1e-5)

        def shifted(batch: Any, score: Any = same) -> torch.Tensor:
            return score(batch) - 0.3  # log π - log π_ref = 0.3 on every token

        penalized = _batch(_policy(base), samples, phase, UpdateOptions(kl_in_reward=0.5), ref_logprobs_fn=shifted)
        assert penalized.metrics["reward_kl"] == pytest.approx(0.3, abs=1e-5)
        if algo == "rloo":
            # each response's reward drops by 0.15 per token: longer responses lose more
            lengths = torch.tensor([len(r) for r in samples.response_ids], dtype=torch.float32)
            from dsrl_fast.rl.advantages import compute_advantages

            want = compute_advantages(samples.rewards - 0.15 * lengths, "rloo", group_ids=samples.group_ids)
            torch.testing.assert_close(penalized.advantages, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs ref_logprobs_fn"):
        _batch(_policy(base), samples, phase, UpdateOptions(kl_in_reward=0.5))


def test_guard_switches_after_patience_and_measures_drift() -> None:
    guard = MarginalGuard(GuardConfig(max_truncated_share=0.5, max_logprob_drift=1.0, patience=2))
    assert not guard.observe(GuardSignals(8.0, 0.1, -2.0)).switch  # baseline -2.0
    first = guard.observe(GuardSignals(8.0, 0.6, -2.5))
    assert not first.switch and "truncated share 0.600 > 0.5" in first.reason and first.logprob_drift == 0.5
    assert not guard.observe(GuardSignals(8.0, 0.1, -2.1)).switch  # a calm step resets the count
    assert not guard.observe(GuardSignals(8.0, 0.1, -3.5)).switch
    second = guard.observe(GuardSignals(8.0, 0.2, -3.6))
    assert second.switch and "marginal log-prob drift 1.600 > 1" in second.reason
    restored = MarginalGuard(GuardConfig(max_logprob_drift=1.0))
    restored.load_state_dict(guard.state_dict())
    assert restored.observe(GuardSignals(8.0, 0.0, -3.5)).switch  # baseline kept across a resume
    rollouts = [Rollout(0, [1, 2], [0.0, 0.0], finished=f) for f in (True, False, False, True)]
    signals = guard_signals(rollouts, {"response_len_mean": 2.0})
    assert signals == GuardSignals(2.0, 0.5, None)
    assert not GuardConfig().enabled and GuardConfig(max_response_len=12).enabled


def test_update_options_validation() -> None:
    for kwargs, match in (({"epochs": 0}, "epochs must be an int >= 1"), ({"old_logprobs": "x"}, "old_logprobs"),
                          ({"lam": 1.5}, "lam must be in"), ({"kl_in_reward": -1.0}, "kl_in_reward")):
        with pytest.raises(ValueError, match=match):
            UpdateOptions(**kwargs)


def test_critic_checkpoint_round_trip(base: torch.nn.Module, tmp_path: Any) -> None:
    """save_critic / load_critic restore the value head, the trunk and the Adam state (the next step matches)."""
    from dsrl_fast.train.critic import load_critic, save_critic

    samples = random_samples()
    phase = phase_for_step(0, algo="ppo", **DEFAULTS)
    trained = _critic(base, lr=1e-2)
    _batch(_policy(base), samples, phase, UpdateOptions(), critic=trained)
    with pytest.raises(FileNotFoundError, match="holds no critic"):
        load_critic(tmp_path, trained.updater)
    save_critic(tmp_path, trained.updater)
    restored = _critic(base, lr=1e-2)
    load_critic(tmp_path, restored.updater)
    after = [_batch(_policy(base), samples, phase, UpdateOptions(), critic=c).metrics["value_loss"]
             for c in (trained, restored)]
    assert after[0] == pytest.approx(after[1], rel=1e-6)
    head = restored.updater.module.model.value_head.weight
    assert head.abs().sum() > 0 and torch.equal(head, trained.updater.module.model.value_head.weight)
