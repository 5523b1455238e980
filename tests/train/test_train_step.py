"""The algorithm table, the dsrl switch, and micro-batch/rank loss normalization of one RL step."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="the RL step runs a transformers model (the train extra)")

from dsrl_fast.model.packed import prepare_packed_model  # noqa: E402
from dsrl_fast.rl.algorithms import ALGORITHMS, phase_for_step  # noqa: E402
from dsrl_fast.train.rl_step import StepSamples, run_update, sample_advantages, selected_samples  # noqa: E402
from dsrl_fast.train.updaters import PolicyModule, TorchUpdater, lr_factor  # noqa: E402
from tests.model.test_model import tiny_model  # noqa: E402

DEFAULTS = dict(switch_step=3, lr=1e-4, marginal_lr=1e-5, clip_low=0.2, clip_high=None, clip_ratio_c=10.0, agg=None,
                pretrain_loss_coef=0.01, marginal_advantage="mean", kl_coef=0.0, kl_type="k3", entropy_coef=0.0,
                temperature=1.0, max_response_len=16)


@pytest.mark.parametrize(("algo", "space", "samples", "estimator"), [
    ("grpo", "conditional", "all", "grpo"), ("dr_grpo", "conditional", "all", "dr_grpo"),
    ("dapo", "conditional", "all", "grpo"), ("rloo", "conditional", "all", "rloo"),
    ("reinforce_pp", "conditional", "all", "reinforce_pp"), ("nsr_rl", "conditional", "negative", "grpo"),
    ("reinforce_pp_baseline", "conditional", "all", "reinforce_pp_baseline"), ("ppo", "conditional", "all", "gae"),
    ("psr_rl", "conditional", "positive", "grpo"), ("prerl", "marginal", "all", "marginal"),
    ("nsr_prerl", "marginal", "negative", "marginal"), ("psr_prerl", "marginal", "positive", "marginal"),
])
def test_algorithm_table(algo: str, space: str, samples: str, estimator: str) -> None:
    phase = phase_for_step(0, algo=algo, **DEFAULTS)
    assert (phase.space, phase.samples, phase.estimator) == (space, samples, estimator)
    assert phase.loss.clip_high == (0.28 if algo == "dapo" else 0.2)
    assert phase.loss.agg == ("seq-mean-token-sum-norm" if algo == "dr_grpo" else "token-mean")
    marginal = space == "marginal"
    assert phase.loss.loss_scale == (0.01 if marginal else 1.0)
    assert phase.lr == (1e-5 if marginal else 1e-4)
    assert phase.loss.clip_ratio_c == 10.0


def test_dsrl_switches_from_nsr_prerl_to_grpo() -> None:
    phases = [phase_for_step(s, algo="dsrl", **DEFAULTS) for s in range(6)]
    assert [p.algo for p in phases] == ["nsr_prerl"] * 3 + ["grpo"] * 3
    assert [(p.space, p.samples) for p in phases[:3]] == [("marginal", "negative")] * 3
    assert [(p.space, p.samples) for p in phases[3:]] == [("conditional", "all")] * 3
    assert phase_for_step(0, algo="dsrl", **dict(DEFAULTS, marginal_advantage="grpo")).estimator == "grpo"
    with pytest.raises(ValueError, match="algo must be one of"):
        phase_for_step(0, algo="trpo", **DEFAULTS)
    assert "dsrl" in ALGORITHMS
    to_ppo = [phase_for_step(s, algo="dsrl", after_switch="ppo", **DEFAULTS) for s in range(2, 4)]
    assert [(p.algo, p.estimator) for p in to_ppo] == [("nsr_prerl", "marginal"), ("ppo", "gae")]
    with pytest.raises(ValueError, match="after_switch must be one of"):
        phase_for_step(0, algo="dsrl", after_switch="nsr_prerl", **DEFAULTS)


def test_selected_samples() -> None:
    adv = torch.tensor([0.5, -0.5, 0.0, -1.0, 2.0])
    assert selected_samples(adv, "negative", True) == ([1, 3], [1, 3])
    assert selected_samples(adv, "positive", True) == ([0, 4], [0, 4])
    assert selected_samples(adv, "all", True) == ([0, 1, 2, 3, 4], [0, 1, 3, 4])
    assert selected_samples(adv, "all", False) == ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])


def test_lr_schedules() -> None:
    assert lr_factor(5, 100, "constant", 10, 0.0) == 1.0
    assert lr_factor(4, 100, "warmup", 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, "cosine", 0, 0.1) == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(0, 100, "cosine", 0, 0.1) == pytest.approx(1.0)


class CapturingUpdater(TorchUpdater):
    """Keeps a copy of the accumulated gradients instead of stepping."""

    def step(self, lr: float) -> float:
        self.grads = {n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None}
        self.optimizer.zero_grad(set_to_none=True)
        return 0.0


def random_samples(groups: int = 3, n: int = 4) -> StepSamples:
    gen = torch.Generator().manual_seed(5)
    prompts, responses, logps = [], [], []
    for g in range(groups):
        prompt = torch.randint(0, 200, (3 + g,), generator=gen).tolist()
        for _ in range(n):
            length = int(torch.randint(1, 9, (), generator=gen))
            prompts.append(prompt)
            responses.append(torch.randint(0, 200, (length,), generator=gen).tolist())
            logps.append([-1.0] * length)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])[: groups * n]
    return StepSamples(prompts, responses, logps, rewards, torch.arange(groups).repeat_interleave(n))


@pytest.mark.parametrize("step", [0, 5])
@pytest.mark.parametrize("agg", [None, "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batching_does_not_change_the_gradient(step: int, agg: str | None) -> None:
    """Token-budget micro-batches with global denominators give the gradient of one big batch."""
    base = prepare_packed_model(tiny_model("qwen3"), attention_backend="torch")
    samples = random_samples()
    phase = phase_for_step(step, algo="dsrl", **dict(DEFAULTS, agg=agg))
    advantages = sample_advantages(samples, phase.estimator)
    grads = []
    for budget in (4096, 14):
        updater = CapturingUpdater(PolicyModule(copy.deepcopy(base), impl="torch"), lr=1e-3, weight_decay=0.0,
                                   betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0)
        result = run_update(updater, samples, advantages, phase, marginal_prefix=(7,), max_tokens=budget,
                            device=torch.device("cpu"), lr=1e-3)
        assert result.stepped
        grads.append(updater.grads)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)


def test_nsr_step_with_no_negative_sample_skips_the_update() -> None:
    base = prepare_packed_model(tiny_model("qwen3"), attention_backend="torch")
    samples = random_samples()
    samples.rewards = torch.ones_like(samples.rewards)
    phase = phase_for_step(0, algo="dsrl", **DEFAULTS)
    updater = CapturingUpdater(PolicyModule(base, impl="torch"), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999),
                               eps=1e-8, grad_clip=1.0)
    result = run_update(updater, samples, sample_advantages(samples, phase.estimator), phase, marginal_prefix=(7,),
                        max_tokens=4096, device=torch.device("cpu"), lr=1e-3)
    assert not result.stepped and not hasattr(updater, "grads")
