"""Trainer runs of the Table 1 baselines' machinery on the toy task: the marginal-phase guard provoked into an early
switch, and dsrl switching to PPO with a critic, mini-batches and epochs (4 steps each)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

if importlib.util.find_spec("transformers") is None:
    pytest.skip("the trainer needs transformers (the train extra), which is not installed", allow_module_level=True)

from dsrl_fast.train.config import load_config  # noqa: E402
from dsrl_fast.train.metrics_log import read_metrics  # noqa: E402
from dsrl_fast.train.plot import _logged_switch, _merge_steps  # noqa: E402
from tests.toy_runs import run  # noqa: E402

pytestmark = pytest.mark.usefixtures("toy_reward", "one_torch_thread", "shared_warmup")


def _rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "reward_mean" in r]


def test_guard_ends_a_collapsing_marginal_phase_early(tmp_path: Path) -> None:
    """NSR-PreRL at a high learning rate drives responses to the 16-token cap within a step (DESIGN §5 saw it at
    lr 1e-4 in 20-30 steps); the guard switches to GRPO right after, long before the planned step 50."""
    summary = run(tmp_path, "algo.switch_step=50", "optim.marginal_lr=3e-3", "guard.max_truncated_share=0.25",
                  "guard.max_logprob_drift=100", "checkpoint_every=0")
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["truncated_share"] <= 0.25 < rows[1]["truncated_share"], [r.get("truncated_share") for r in rows]
    assert [r["algo"] for r in rows] == ["nsr_prerl", "nsr_prerl", "grpo", "grpo"]
    assert [r["switch_step"] for r in rows] == [50, 2, 2, 2]
    assert "truncated share" in rows[1]["guard"] and "guard" not in rows[0]
    assert rows[0]["marginal_logprob_drift"] == 0.0 and "marginal_logprob_mean" in rows[0]
    switch, note = _logged_switch(_merge_steps(read_metrics(tmp_path / "metrics.jsonl")))
    assert switch == 2 and note.startswith("guard switched at step 2 instead of 50: truncated share")
    assert summary.plot_path is not None and Path(summary.plot_path).is_file()


def test_guard_can_stop_a_marginal_run(tmp_path: Path) -> None:
    """guard.action=stop on NSR-PreRL alone: the run ends after the step that crossed the limit, with the final
    evaluation, checkpoint and plot of that step."""
    summary = run(tmp_path, "algo.algo=nsr_prerl", "optim.marginal_lr=3e-3", "guard.max_truncated_share=0.25",
                  "guard.action=stop", "checkpoint_every=0")
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["guard_stop"] == 2
    assert summary.steps == 2 and summary.accuracy_after is not None
    assert summary.checkpoint_path.endswith("step_000002/hf") and Path(summary.checkpoint_path).is_dir()


def test_dsrl_then_ppo_trains_the_critic_from_step_0(tmp_path: Path) -> None:
    """The critic learns on the conditional space during the marginal phase and its warm-up steps; PPO then makes
    mini_batches × epochs updates per step with old log-probs (its clip fraction is no longer 0); the critic is
    checkpointed and restored on resume."""
    ppo = ("algo.after_switch=ppo", "optim.mini_batches=2", "optim.epochs=2", "critic.lr=1e-3",
           "critic.warmup_steps=3", "algo.switch_step=1")
    run(tmp_path, *ppo, "steps=4")
    assert (tmp_path / "checkpoints" / "step_000004" / "critic.pt").is_file()
    rows = _rows(tmp_path)
    assert [r["algo"] for r in rows] == ["nsr_prerl", "ppo", "ppo", "ppo"]
    assert all(r["value_loss"] > 0 and "explained_variance" in r for r in rows)
    assert [r.get("update_skipped") is not None for r in rows] == [False, True, True, False]
    assert "critic warm-up" in rows[1]["update_skipped"]
    assert rows[3]["updates"] == 4 and rows[3]["clip_frac"] > 0
    run(tmp_path, *ppo, "steps=5", "resume=true")  # the critic comes back with the policy
    resumed = _rows(tmp_path)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4] and resumed[4]["value_loss"] > 0


def test_config_checks_of_the_new_options() -> None:
    with pytest.raises(ValueError, match="guard limits with guard.action='switch' need a marginal phase"):
        load_config(None, ["algo.algo=nsr_prerl", "guard.max_response_len=10"])
    with pytest.raises(ValueError, match="guard limits with guard.action='stop' need a marginal phase"):
        load_config(None, ["algo.algo=grpo", "guard.max_response_len=10", "guard.action=stop"])
    with pytest.raises(ValueError, match="optim.mini_batches must be <= prompts_per_step"):
        load_config(None, ["prompts_per_step=4", "optim.mini_batches=5"])
    with pytest.raises(ValueError, match="algo.after_switch must be one of"):
        load_config(None, ["algo.after_switch=nsr_prerl"])
    with pytest.raises(ValueError, match="optim.old_logprobs must be one of"):
        load_config(None, ["optim.old_logprobs=vllm"])
    with pytest.raises(ValueError, match="guard.max_truncated_share must be <= 1"):
        load_config(None, ["guard.max_truncated_share=1.5"])
    cfg = load_config(None, ["algo.algo=ppo", "critic.value_clip=null", "algo.kl_in_reward_coef=0.01"])
    assert cfg.critic.value_clip is None and cfg.algo.kl_in_reward_coef == 0.01
