"""One RL step of a run: draw prompts, roll out, score, update the policy (and critic), sync the sampler, measure;
and the evaluation a run makes before, during and after RL."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist

from dsrl_fast.distributed import reduce_floats
from dsrl_fast.eval.periodic import HELD_OUT, evaluate_tasks
from dsrl_fast.eval.thoughts import count_thoughts
from dsrl_fast.interrupt import StopRequest
from dsrl_fast.reward import RewardFn, reward_stats
from dsrl_fast.rl.algorithms import Phase, phase_for_step
from dsrl_fast.rl.guard import guard_signals
from dsrl_fast.rollout.base import SamplingConfig
from dsrl_fast.train.batch_update import Packing, UpdateOptions, policy_logprob_fn, run_batch
from dsrl_fast.train.config import TrainConfig
from dsrl_fast.train.metrics_log import print0
from dsrl_fast.train.rl_step import collect_samples
from dsrl_fast.train.run_state import Run
from dsrl_fast.train.updaters import lr_factor


def rl_step(run: Run, stop: StopRequest, step: int) -> dict[str, Any]:
    """Step `step` of `run`: returns its metrics.jsonl row (global over ranks; None values included). A stop request
    cuts the rollout short (Stopping) and, until the optimizer step, abandons the step (run.stop_point)."""
    cfg, d, state = run.cfg, run.d, run.state
    assert run.engine is not None and run.updater is not None and run.sampler is not None
    assert run.micro_batch_stops is not None and run.sample_log is not None
    t0 = time.perf_counter()
    run.stop_point = (step, run.sampler.state_dict(), False)  # until its optimizer step, a step can be abandoned
    run.micro_batch_stops.arm()
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    torch.manual_seed(_step_seed(cfg.seed, step, d.rank))
    phase = _phase(cfg, step, state["switch_step"])
    if cfg.algo.algo == "dsrl" and step == state["switch_step"] and run.ref_model is not None:
        # Full (gathered under ZeRO-3) actor weights; a tied LM head arrives through its embedding.
        run.ref_model.load_state_dict(dict(run.updater.named_parameters_for_sync()), strict=False)

    # Roll out this rank's share of the step's prompts.
    per_rank = cfg.prompts_per_step // d.world_size
    mine = run.sampler.next_batch()[d.rank * per_rank:(d.rank + 1) * per_rank]
    my_prompts = [run.prompts[i] for i in mine]
    # Seeds by global prompt index: vLLM samples each prompt alike on any number of ranks.
    seed = _step_seed(cfg.seed, step, 0) + d.rank * per_rank * cfg.rollout.n
    t_rollout = time.perf_counter()
    rollouts = run.engine.generate(my_prompts, sampling(cfg, run.tokenizer, cfg.rollout.n, seed))
    stop.check()  # the HF engine cuts its generation short when asked to stop

    # Score the responses.
    t_reward = time.perf_counter()
    texts = run.tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    rewards = run.reward_fn(texts, [run.problems[mine[r.prompt_index]].answer for r in rollouts])
    reward_counts = _reward_counts(run.reward_fn)
    for r, text, reward in list(zip(rollouts, texts, rewards))[:cfg.log_samples]:
        run.sample_log.write(step, run.problems[mine[r.prompt_index]].prompt_text, text, reward)
    samples = collect_samples(my_prompts, rollouts, rewards, group_offset=d.rank * per_rank)

    # Update the policy (and the critic), then hand the new weights to the sampler.
    lr = phase.lr * lr_factor(step, cfg.steps, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
    t_update = time.perf_counter()
    ref_fn = None if run.ref_model is None else policy_logprob_fn(run.ref_model, phase.loss.temperature)
    outcome = run_batch(run.updater, samples, phase, step=step, lr=lr,
                        packing=Packing(run.marginal_prefix, cfg.optim.max_tokens_per_micro_batch, d.device),
                        options=_update_options(cfg, marginal_logprob=run.guard is not None), critic=run.critic,
                        ref_logprobs_fn=ref_fn)
    result = outcome.update
    t_sync = time.perf_counter()
    if result.stepped:
        run.engine.update_weights(run.updater.named_parameters_for_sync())
    t_end = time.perf_counter()

    # Measure, and let the guard end the marginal phase (or the run).
    truncated = sum(not r.finished for r in rollouts)
    metrics = _step_metrics(cfg, phase, samples, texts, truncated, result, lr, t_end - t0, state)
    metrics.update(_peak_memory(d.device))
    metrics.update(reward_counts)
    metrics.update(_phase_times(samples, result, rollout_s=t_reward - t_rollout, reward_s=t_update - t_reward,
                                update_s=t_sync - t_update, sync_s=t_end - t_sync))
    metrics.update(outcome.metrics)
    if cfg.algo.algo == "dsrl":
        metrics["switch_step"] = state["switch_step"]
    if run.guard is not None and phase.space == "marginal":
        _apply_guard(run, step, phase, rollouts, metrics)
    note = None if result.stepped else outcome.skip_reason or _skip_reason(metrics, phase.samples)
    metrics["update_skipped"] = note
    return metrics


def _apply_guard(run: Run, step: int, phase: Phase, rollouts: Any, metrics: dict[str, Any]) -> None:
    """Feed the marginal step's signals to the guard; on its decision bring the switch forward or end the run."""
    assert run.guard is not None and run.progress is not None
    signals = guard_signals(rollouts, metrics)
    decision = run.guard.observe(signals)
    run.state["guard"] = run.guard.state_dict()
    metrics.update(guard=decision.reason, truncated_share=signals.truncated_share,
                   marginal_logprob_drift=decision.logprob_drift)
    if decision.switch and run.cfg.guard.action == "stop":
        run.cfg = dataclasses.replace(run.cfg, steps=step + 1)  # the run ends after this step
        metrics["guard_stop"] = step + 1
        run.progress.end_at(step + 1)
        print0(f"guard: the run stops after step {step} ({decision.reason})")
    elif decision.switch:
        run.state["switch_step"] = metrics["switch_step"] = step + 1
        print0(f"guard: the marginal phase ends after step {step} ({decision.reason}); "
               f"{phase.algo} -> {run.cfg.algo.after_switch} from step {step + 1}")


def evaluate(run: Run) -> tuple[float | None, dict[str, float]]:
    """(held-out accuracy, metrics): the accuracy is the mean reward of eval_n responses per held-out problem (None
    without held-out problems); the metrics hold every task's avg@eval_n and pass@k for k = 1, 2, 4, ... <= eval_n as
    "eval/<task>/<metric>". Sampled at the rollout temperature (or greedy) by dsrl_fast.eval.periodic."""
    cfg = run.cfg
    assert run.engine is not None
    params = sampling(cfg, run.tokenizer, cfg.eval_n, cfg.seed + 17, cfg.eval_greedy)
    ks = [2**i for i in range(cfg.eval_n.bit_length())]
    metrics = evaluate_tasks(run.engine, run.tokenizer, run.eval_tasks, run.reward_fn, sampling=params, ks=ks,
                             rank=run.d.rank, world_size=run.d.world_size, reduce=reduce_floats)
    return metrics.get(f"{HELD_OUT}/avg@{cfg.eval_n}"), {f"eval/{k}": v for k, v in metrics.items()}


def sampling(cfg: TrainConfig, tokenizer: Any, n: int, seed: int, greedy: bool = False) -> SamplingConfig:
    """The rollout sampling settings of `cfg` for `n` responses per prompt (greedy: temperature 0)."""
    return SamplingConfig(temperature=0.0 if greedy else cfg.rollout.temperature, top_p=cfg.rollout.top_p, n=n,
                          max_new_tokens=cfg.rollout.max_response_len,
                          stop_token_ids=(tokenizer.eos_token_id,), seed=seed)


def _update_options(cfg: TrainConfig, *, marginal_logprob: bool) -> UpdateOptions:
    o, a = cfg.optim, cfg.algo
    return UpdateOptions(mini_batches=o.mini_batches, epochs=o.epochs, old_logprobs=o.old_logprobs,
                         kl_in_reward=a.kl_in_reward_coef, gamma=a.gae_gamma, lam=a.gae_lambda,
                         marginal_logprob=marginal_logprob and cfg.guard.max_logprob_drift is not None)


def _phase(cfg: TrainConfig, step: int, switch_step: int) -> Phase:
    """The update rule of `step`; switch_step: dsrl's switch actually used (the guard may bring it forward)."""
    a = cfg.algo
    return phase_for_step(step, algo=a.algo, switch_step=switch_step, after_switch=a.after_switch, lr=cfg.optim.lr,
                          marginal_lr=cfg.optim.marginal_lr, clip_low=a.clip_low, clip_high=a.clip_high,
                          clip_ratio_c=a.clip_ratio_c, agg=a.agg, pretrain_loss_coef=a.pretrain_loss_coef,
                          marginal_advantage=a.marginal_advantage, kl_coef=a.kl_coef, kl_type=a.kl_type,
                          entropy_coef=a.entropy_coef, temperature=cfg.rollout.temperature,
                          max_response_len=cfg.rollout.max_response_len)


def _reward_counts(reward_fn: RewardFn) -> dict[str, int]:
    """The last reward call's ``reward_timeouts``, ``reward_errors`` and ``no_answer`` summed over ranks (empty
    when the reward does not count outcomes)."""
    stats = reward_stats(reward_fn)
    if stats is None:
        return {}
    counts = stats.metrics()
    return dict(zip(counts, (int(v) for v in reduce_floats([float(v) for v in counts.values()])), strict=True))


def _phase_times(samples: Any, result: Any, *, rollout_s: float, reward_s: float, update_s: float,
                 sync_s: float) -> dict[str, float | None]:
    """Seconds of each phase of a step (the slowest rank's) and the token rates of generation and update."""
    generated = float(sum(len(r) for r in samples.response_ids))
    (generated,) = reduce_floats([generated])
    rollout_s, reward_s, update_s, sync_s = reduce_floats([rollout_s, reward_s, update_s, sync_s], dist.ReduceOp.MAX)
    return {"rollout_s": rollout_s, "reward_s": reward_s, "update_s": update_s, "sync_s": sync_s,
            "rollout_tokens_per_s": generated / rollout_s if rollout_s > 0 else None,
            "update_tokens_per_s": result.packed_tokens / update_s if update_s > 0 and result.stepped else None,
            "rank_token_imbalance": result.rank_token_imbalance}


def _peak_memory(device: torch.device) -> dict[str, float | None]:
    """The step's peak CUDA memory in GiB, the largest over ranks, as torch's allocator counts it: held by tensors
    (``peak_memory_allocated_gib``) and reserved by its cache (``peak_memory_reserved_gib``); None off CUDA."""
    if device.type != "cuda":
        return {"peak_memory_allocated_gib": None, "peak_memory_reserved_gib": None}
    allocated, reserved = reduce_floats([torch.cuda.max_memory_allocated(device) / 2**30,
                                         torch.cuda.max_memory_reserved(device) / 2**30], dist.ReduceOp.MAX)
    return {"peak_memory_allocated_gib": allocated, "peak_memory_reserved_gib": reserved}


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 101 + rank) % (2**31 - 1)


def _skip_reason(metrics: dict[str, Any], samples_filter: str) -> str:
    """Why a step made no update, from its global reward figures."""
    if metrics["reward_mean"] == 0:
        return "every reward is 0"
    if metrics["reward_mean"] == 1:
        return "every reward is 1"
    kept = {"negative": "negative ", "positive": "positive ", "all": ""}[samples_filter]
    return f"no {kept}sample has a non-zero advantage"


def _step_metrics(cfg: TrainConfig, phase: Phase, samples: Any, texts: list[str], truncated: int, result: Any,
                  lr: float, seconds: float, totals: dict[str, Any]) -> dict[str, Any]:
    """The metrics.jsonl row of one step (global over ranks); `truncated`: this rank's responses cut by the length
    cap. Adds the step's fully solved / unsolved prompt groups to the running counts in `totals` (the checkpointed
    trainer state)."""
    n = cfg.rollout.n
    rewards = samples.rewards.view(-1, n)
    thoughts = count_thoughts(texts)
    lengths = [len(r) for r in samples.response_ids]
    prompt_tokens = sum(len(p) for p in samples.prompt_ids)
    sums = reduce_floats([
        float(rewards.sum()), float((rewards == 1).float().sum()), float(rewards.numel()), float(sum(lengths)),
        float((rewards == 1).all(dim=1).sum()), float((rewards < 1).all(dim=1).sum()), float(rewards.shape[0]),
        float(thoughts.transition), float(thoughts.reflection), float(thoughts.steps),
        float(prompt_tokens + sum(lengths)), float(truncated),
    ])
    total, correct, count, length, solved, unsolved, groups, transition, reflection, steps, tokens, cut = sums
    for key, value in (("fully_solved_total", solved), ("fully_unsolved_total", unsolved)):
        totals[key] = totals.get(key, 0) + round(value)
    return {
        "space": phase.space,
        "samples": phase.samples,
        "algo": phase.algo,
        "reward_mean": total / count,
        "accuracy": correct / count,
        "response_len_mean": length / count,
        "truncated_share": cut / count,
        "loss": result.loss,
        "clip_frac": result.clip_frac,
        "entropy": result.entropy,
        "grad_norm": result.grad_norm,
        "tokens_per_s": tokens / seconds,
        "logprob_drift": result.logprob_drift,
        "fully_solved": solved / groups,
        "fully_unsolved": unsolved / groups,
        "fully_solved_total": totals["fully_solved_total"],
        "fully_unsolved_total": totals["fully_unsolved_total"],
        "transition_share": transition / max(steps, 1.0),
        "reflection_share": reflection / max(steps, 1.0),
        "execution_share": (steps - transition - reflection) / max(steps, 1.0),
        "trained_tokens": result.trained_tokens,
        "lr": lr,
        "step_seconds": seconds,
    }
