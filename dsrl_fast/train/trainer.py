"""The DSRL training loop: rollouts → rewards → advantages → packed fused-loss updates → weight sync.

Runs as a plain process, under `torchrun` or under the `deepspeed` launcher (data parallel: each rank rolls out
its share of the step's prompts; every group of n rollouts stays on one rank). Each step draws its randomness from
(seed, step, rank), and the prompt sampler's position is checkpointed, so a resumed run repeats no step and loses
none.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsrl_fast.analysis.thoughts import count_thoughts
from dsrl_fast.data import PromptSampler
from dsrl_fast.errors import RunInterrupted, UserError
from dsrl_fast.eval.periodic import HELD_OUT, EvalTask, evaluate_tasks, load_benchmarks
from dsrl_fast.model import prepare_packed_model
from dsrl_fast.reward import RewardFn, get_reward_fn, reward_stats
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig
from dsrl_fast.train.algorithms import Phase, phase_for_step, uses_critic
from dsrl_fast.train.batch_update import CriticSetup, UpdateOptions, policy_logprob_fn, run_batch
from dsrl_fast.train.checkpoint import latest_checkpoint, load_checkpoint, load_reference, save_checkpoint
from dsrl_fast.train.collectives import reduce_floats
from dsrl_fast.train.config import TrainConfig, config_to_dict, save_config
from dsrl_fast.train.critic import CriticModule, build_critic_model, load_critic
from dsrl_fast.train.guard import MarginalGuard, guard_signals
from dsrl_fast.train.interrupt import MicroBatchStops, StopRequest, Stopping
from dsrl_fast.train.metrics_log import MetricsLogger, SampleLog, StepProgress, print0
from dsrl_fast.train.rl_step import collect_samples, run_update
from dsrl_fast.train.update import (
    DeepSpeedUpdater,
    PolicyModule,
    TorchUpdater,
    Updater,
    deepspeed_config,
    lr_factor,
)
from dsrl_fast.train.resume_check import ResumePlan, check_resume, record_resume
from dsrl_fast.train.run_report import (
    end_failed_run,
    final_eval_record,
    print_outputs,
    write_plot,
    write_run_summary,
)
from dsrl_fast.train.run_dir import SFT_DIR, VLLM_INIT_DIR, RunLock, lock_output_dir, prepare_output_dir
from dsrl_fast.train.setup import (
    build_model,
    build_tokenizer,
    check_model,
    check_requirements,
    encode_problems,
    load_train_eval_problems,
    resolve_marginal_prefix,
    resolve_run_length,
)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    device: torch.device


@dataclass
class TrainSummary:
    """What a finished run reports (accuracies are None when the run has no held-out problems); eval_before and
    eval_after hold every metric of the evaluations before and after RL ("eval/<task>/<metric>")."""

    accuracy_before: float | None
    accuracy_after: float | None
    steps: int
    seconds: float
    output_dir: str
    plot_path: str | None
    checkpoint_path: str
    eval_before: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_after: dict[str, float] = dataclasses.field(default_factory=dict)


def init_distributed() -> Dist:
    """Join the process group when launched with WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, device)


@contextlib.contextmanager
def generation_attention(model: torch.nn.Module) -> Iterator[None]:
    """Generate with SDPA (padded batches, KV cache), then return to the packed attention used for training."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class _SharedModelEngine:
    """Runs an HF engine over the training model itself with the generation attention switched in."""

    def __init__(self, engine: RolloutEngine, model: torch.nn.Module):
        self.engine, self.model = engine, model

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Any]:
        with generation_attention(self.model):
            return self.engine.generate(prompts, sampling)

    def update_weights(self, named_tensors: Any) -> None:
        """The engine shares the trainer's parameters: nothing to copy."""

    def close(self) -> None:
        self.engine.close()


def build_engine(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any,
                 should_stop: Callable[[], bool] | None = None) -> RolloutEngine:
    """The rollout engine of rollout.engine: the HF engine on the shared model, or a colocated vLLM per rank (or per
    block of rollout.tensor_parallel_size ranks).

    vLLM starts from model.name_or_path itself; the toy model, built in code, is first exported by rank 0 to
    ``<output_dir>/vllm_init`` (removed when the run ends). Every rank must call this. should_stop: asked by the HF
    engine after every generated token (a stopping run cuts its generation short); vLLM finishes each call.
    """
    if cfg.rollout.engine == "hf":
        from dsrl_fast.rollout.hf_engine import HFEngine

        return _SharedModelEngine(HFEngine(model, should_stop=should_stop), model)
    from dsrl_fast.rollout.vllm_engine import VLLMEngine

    source = cfg.model.name_or_path
    if source is None:
        export = Path(cfg.output_dir) / VLLM_INIT_DIR
        if not (dist.is_initialized() and dist.get_rank() != 0):
            model.save_pretrained(export)
            tokenizer.save_pretrained(export)
        if dist.is_initialized():
            dist.barrier()
        source = str(export)
    # vLLM refuses a max_model_len beyond the model's positions (the toy model has 64).
    longest = cfg.data.max_prompt_len + cfg.rollout.max_response_len
    positions = getattr(model.config, "max_position_embeddings", None)
    # The trainer's dtype, not vLLM's "auto" (which runs an fp32 model in bf16 on CPU): sampler and trainer
    # log-probs must agree.
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return VLLMEngine(source, dtype=dtype, seed=cfg.seed,
                      gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                      cpu_kv_cache_gib=math.ceil(cfg.rollout.vllm_kv_cache_gib),
                      max_model_len=min(longest, positions) if positions else longest,
                      tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                      sleep_between_generations=cfg.rollout.sleep_between_generations,
                      trust_remote_code=cfg.model.trust_remote_code)


def build_updater(cfg: TrainConfig, module: PolicyModule, world_size: int) -> Updater:
    """DeepSpeed when deepspeed.enabled (None: when distributed), else single-process AdamW; both keep fp32 master
    weights for a 16-bit model."""
    o, ds = cfg.optim, cfg.deepspeed
    use_ds = ds.enabled if ds.enabled is not None else world_size > 1
    if not use_ds:
        assert world_size == 1, "check_requirements refuses deepspeed.enabled=false when distributed"
        return TorchUpdater(module, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                            grad_clip=o.grad_clip)
    dtype = next(module.parameters()).dtype
    config = deepspeed_config(zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer,
                              offload_params=ds.offload_params, dtype=dtype, lr=o.lr, weight_decay=o.weight_decay,
                              betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip)
    return DeepSpeedUpdater(module, config)


def build_critic(cfg: TrainConfig, policy: torch.nn.Module, world_size: int) -> CriticSetup | None:
    """PPO's critic (a value head on a copy of the policy, or on critic.model_path) with its own optimizer / ZeRO
    engine; None when the algorithm has no critic. Call before the policy's updater (ZeRO-3 partitions it)."""
    if not uses_critic(cfg.algo.algo, cfg.algo.after_switch):
        return None
    model = build_critic_model(policy, cfg.critic.model_path, trust_remote_code=cfg.model.trust_remote_code,
                               attention_backend=cfg.model.attention_backend)
    updater = build_updater(cfg, CriticModule(model), world_size)  # type: ignore[arg-type]
    return CriticSetup(updater, cfg.critic.lr, cfg.critic.value_clip, cfg.critic.warmup_steps)


def _update_options(cfg: TrainConfig) -> UpdateOptions:
    o, a = cfg.optim, cfg.algo
    return UpdateOptions(mini_batches=o.mini_batches, epochs=o.epochs, old_logprobs=o.old_logprobs,
                         kl_in_reward=a.kl_in_reward_coef, gamma=a.gae_gamma, lam=a.gae_lambda)


def _phase(cfg: TrainConfig, step: int, switch_step: int) -> Phase:
    """The update rule of `step`; switch_step: dsrl's switch actually used (the guard may bring it forward)."""
    a = cfg.algo
    return phase_for_step(step, algo=a.algo, switch_step=switch_step, after_switch=a.after_switch, lr=cfg.optim.lr,
                          marginal_lr=cfg.optim.marginal_lr, clip_low=a.clip_low, clip_high=a.clip_high,
                          clip_ratio_c=a.clip_ratio_c, agg=a.agg, pretrain_loss_coef=a.pretrain_loss_coef,
                          marginal_advantage=a.marginal_advantage, kl_coef=a.kl_coef, kl_type=a.kl_type,
                          entropy_coef=a.entropy_coef, temperature=cfg.rollout.temperature,
                          max_response_len=cfg.rollout.max_response_len)


def _sampling(cfg: TrainConfig, tokenizer: Any, n: int, seed: int, greedy: bool = False) -> SamplingConfig:
    return SamplingConfig(temperature=0.0 if greedy else cfg.rollout.temperature, top_p=cfg.rollout.top_p, n=n,
                          max_new_tokens=cfg.rollout.max_response_len,
                          stop_token_ids=(tokenizer.eos_token_id,), seed=seed)


def evaluate(cfg: TrainConfig, engine: RolloutEngine, tokenizer: Any, reward_fn: RewardFn, tasks: list[EvalTask],
             d: Dist, *, greedy: bool) -> tuple[float | None, dict[str, float]]:
    """(held-out accuracy, metrics): the accuracy is the mean reward of eval_n responses per held-out problem (None
    without held-out problems); the metrics hold every task's avg@eval_n and pass@k for k = 1, 2, 4, ... <= eval_n as
    "eval/<task>/<metric>". Sampled at the rollout temperature (or greedy) by dsrl_fast.eval.periodic."""
    sampling = _sampling(cfg, tokenizer, cfg.eval_n, cfg.seed + 17, greedy)
    ks = [2**i for i in range(cfg.eval_n.bit_length())]
    metrics = evaluate_tasks(engine, tokenizer, tasks, reward_fn, sampling=sampling, ks=ks, rank=d.rank,
                             world_size=d.world_size, reduce=reduce_floats)
    return metrics.get(f"{HELD_OUT}/avg@{cfg.eval_n}"), {f"eval/{k}": v for k, v in metrics.items()}


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


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 101 + rank) % (2**31 - 1)


def _prepare_output_dir(cfg: TrainConfig, d: Dist) -> tuple[Path | None, RunLock | None, ResumePlan | None]:
    """Rank 0 takes output_dir's run lock, checks (and with overwrite clears) the directory and checks what a resume
    changes; every rank gets the checkpoint to resume from. Returns (checkpoint, rank 0's lock, rank 0's accepted
    resume); the caller releases the lock when the run ends."""
    error = lock = plan = None
    if d.rank == 0:
        try:
            lock = lock_output_dir(cfg.output_dir)
            resume_from = prepare_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite)
            plan = None if resume_from is None else check_resume(cfg, resume_from, d.world_size)
        except BaseException as exc:
            if lock is not None:
                lock.release()
            if not isinstance(exc, UserError):
                raise
            error = exc
    (failed,) = reduce_floats([float(error is not None)])
    if error is not None:
        raise error
    if failed:
        raise UserError(f"output_dir {cfg.output_dir!r} was refused on rank 0 (see its message)")
    return (latest_checkpoint(cfg.output_dir) if cfg.resume else None), lock, plan


def _load_sampler(sampler: PromptSampler, state: dict[str, Any]) -> None:
    """Continue the checkpoint's data order; UserError when an allowed config change altered the training set."""
    if state.get("n") != sampler.n:
        raise UserError(f"resume=true needs the checkpoint's {state.get('n')} training problems, got {sampler.n}: "
                        "the data settings changed (resume_changes=allow cannot change the training set); resume "
                        "with the saved data settings or start a new run in another output_dir")
    sampler.load_state_dict(state)


def _describe_accuracy(name: str, accuracy: float | None) -> str:
    if accuracy is not None:
        return f"held-out accuracy {name}: {accuracy:.3f}"
    return f"held-out accuracy {name}: not measured (no held-out problems: set data.eval_path)"


def _skip_reason(metrics: dict[str, Any], samples_filter: str) -> str:
    """Why a step made no update, from its global reward figures."""
    if metrics["reward_mean"] == 0:
        return "every reward is 0"
    if metrics["reward_mean"] == 1:
        return "every reward is 1"
    kept = {"negative": "negative ", "positive": "positive ", "all": ""}[samples_filter]
    return f"no {kept}sample has a non-zero advantage"


def train(cfg: TrainConfig) -> TrainSummary:
    """Run `cfg` end to end and return the before/after accuracy, wall time and where the outputs are.

    Everything checkable is checked before the model loads (UserError): the output directory (and its run lock, held
    by rank 0 until the run ends), what a resume changes, the data, optional packages. The first SIGINT/SIGTERM stops
    the run at its next check point (RunInterrupted); a second aborts at once (RunAborted). Check points: every
    warm-up step, every generated token (HF engine; vLLM: each generate call), before every micro-batch until the
    step's optimizer step, and after each rollout, evaluation, step and checkpoint. Before RL (warm-up, first
    evaluation) nothing is saved and resume=true starts over; a step cut before its optimizer step is abandoned and
    the checkpoint holds the steps before it (the resumed run redoes it identically); a cut evaluation is redone by
    the resumed run before it goes on. An OSError (a full disk) ends the progress bar and writes the plot and summary
    if it still can.

    summary.json (rank 0) holds ``status`` ("finished", "interrupted" or "failed" with ``error``),
    ``accuracy_before`` / ``accuracy_after``, ``eval_before`` / ``eval_after`` (every "eval/<set>/<metric>" of the
    evaluations before and after RL), ``seconds``, ``checkpoint`` (the newest complete one), ``metrics``, ``plot``,
    and ``steps`` / ``model`` (finished) or ``steps_done`` (interrupted).
    """
    started = time.perf_counter()
    d = init_distributed()
    check_requirements(cfg, d.world_size)
    problems, held_out = load_train_eval_problems(cfg)
    benchmarks = load_benchmarks(cfg.eval_benchmarks, limit=cfg.data.eval_size)
    cfg = resolve_run_length(cfg, len(problems))
    assert cfg.steps is not None
    out = Path(cfg.output_dir)
    check_model(cfg)
    resume_from, lock, resume_plan = _prepare_output_dir(cfg, d)  # rank 0 holds the run lock until the end
    try:
        tokenizer = build_tokenizer(cfg)
        problems, prompts = encode_problems(cfg, tokenizer, problems, "training")
        held_out, eval_prompts = encode_problems(cfg, tokenizer, held_out, "held-out")
        eval_tasks = [EvalTask(HELD_OUT, held_out, eval_prompts)]
        eval_tasks += [EvalTask(label, *encode_problems(cfg, tokenizer, extra, label)) for label, extra in benchmarks]
        prefix = resolve_marginal_prefix(cfg, tokenizer)

        torch.manual_seed(cfg.seed)
        model = build_model(cfg, d.device, tokenizer)
        reward_fn = get_reward_fn(cfg.reward)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    engine = progress = logger = sample_log = None
    trainer_state: dict[str, Any] = {}
    final_eval: dict[str, Any] = {}  # the evaluation after RL, once measured
    # What a stop saves: None before RL (nothing), else (finished steps, the sampler state to checkpoint or None for
    # the current one, whether the evaluation after those steps is still to run).
    point: tuple[int, dict[str, Any] | None, bool] | None = None
    with StopRequest() as stop:
        try:
            stop.action = "stopping (nothing is saved before RL starts; resume=true starts over)" \
                if resume_from is None else "stopping at the next check point"
            engine = build_engine(cfg, model, tokenizer, should_stop=lambda: stop.requested)
            if resume_from is None and cfg.sft.steps > 0:
                from dsrl_fast.toy import sft_target, supervised_warmup
                from dsrl_fast.toy_corrections import correction_target

                print0(f"supervised warm-up of {cfg.sft.steps} steps (batch {cfg.sft.batch_size}, lr {cfg.sft.lr:g})")
                target = correction_target if cfg.data.toy_task == "corrections" else sft_target
                losses = supervised_warmup(model, tokenizer, problems, cfg.sft.steps, batch_size=cfg.sft.batch_size,
                                           lr=cfg.sft.lr, seed=cfg.seed, should_stop=lambda: stop.requested,
                                           target=target)
                stop.check()
                if d.rank == 0:  # the "before RL" model, for `dsrl-fast eval` comparisons
                    model.save_pretrained(out / SFT_DIR)
                    tokenizer.save_pretrained(out / SFT_DIR)
                print0(f"supervised warm-up: {cfg.sft.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
                       f"model saved to {out / SFT_DIR}")
                engine.update_weights(model.state_dict().items())

            prepare_packed_model(model, attention_backend=cfg.model.attention_backend, use_liger=cfg.model.use_liger)
            module = PolicyModule(model)
            # The reference is copied before the updater exists: under ZeRO-3 the model's tensors are partitioned
            # after.
            ref_model = _frozen_copy(model) if cfg.algo.kl_coef > 0 or cfg.algo.kl_in_reward_coef > 0 else None
            critic = build_critic(cfg, model, d.world_size)
            updater = build_updater(cfg, module, d.world_size)
            updater.stops = micro_batch_stops = MicroBatchStops(stop)
            if critic is not None:
                critic.updater.stops = micro_batch_stops
            sampler = PromptSampler(len(problems), cfg.prompts_per_step, seed=cfg.seed,
                                    drop_last=cfg.epochs is not None)
            start_step = 0
            if resume_from is not None:
                trainer_state = load_checkpoint(resume_from, updater)
                _load_sampler(sampler, trainer_state["sampler"])
                start_step = trainer_state["step"]
                if ref_model is not None:
                    load_reference(resume_from, ref_model)
                if critic is not None:
                    load_critic(resume_from, critic.updater)
                engine.update_weights(updater.named_parameters_for_sync())
                print0(f"resumed from {resume_from} at step {start_step}")
            trainer_state.setdefault("switch_step", cfg.algo.switch_step)
            guard = MarginalGuard(cfg.guard) if cfg.guard.enabled else None
            if guard is not None:
                guard.load_state_dict(trainer_state.get("guard", {}))
            if resume_plan is not None:  # only now: a refused or failed resume leaves the previous config in place
                record_resume(cfg, resume_plan)
            elif d.rank == 0:
                save_config(cfg, out / "config.yaml")
            if resume_from is None:
                trainer_state["accuracy_before"], before = evaluate(cfg, engine, tokenizer, reward_fn, eval_tasks, d,
                                                                    greedy=cfg.eval_greedy)
                trainer_state["eval_before"] = before
                stop.check()  # a generation cut short makes the figures meaningless
                print0(_describe_accuracy("before RL", trainer_state["accuracy_before"]))
                if len(eval_tasks) > 1 or cfg.eval_n > 1:
                    print0("before RL: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in before.items()))

            logger = MetricsLogger(out, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                   config_dict=config_to_dict(cfg), resume=resume_from is not None)
            sample_log = SampleLog(out, resume_step=start_step if resume_from is not None else None)
            if resume_from is not None:
                logger.truncate_after(start_step)
            if resume_from is None or start_step == 0:  # a stop in step 0 checkpoints step 0, before this record
                logger.log(0, final_eval_record("before", trainer_state.get("accuracy_before"),
                                                trainer_state.get("eval_before", {})))
            progress = StepProgress(cfg.steps, start_step, enabled=cfg.progress)
            per_rank = cfg.prompts_per_step // d.world_size
            last_checkpoint: Path | None = resume_from

            def checkpoint(done: int) -> Path:
                return save_checkpoint(out, done, updater, tokenizer, dict(trainer_state, sampler=sampler.state_dict()),
                                       cfg.keep_checkpoints, reference=ref_model,
                                       critic=None if critic is None else critic.updater)

            def periodic_eval(step: int) -> None:
                acc, results = evaluate(cfg, engine, tokenizer, reward_fn, eval_tasks, d, greedy=cfg.eval_greedy)
                stop.check()  # a generation cut short: the resumed run evaluates again
                if acc is not None:
                    results["eval_accuracy"] = acc
                if results:
                    logger.log(step, {"step": step, **results})

            stop.action = "abandoning the current step (or evaluation) and saving a checkpoint of the finished steps"
            if trainer_state.pop("eval_pending", False):  # a stop cut the evaluation after step start_step - 1
                point = (start_step, None, True)
                periodic_eval(start_step - 1)
                last_checkpoint = checkpoint(start_step)  # without the flag: a later resume must not evaluate again
            point = (start_step, None, False)

            for step in range(start_step, cfg.steps):
                t0 = time.perf_counter()
                point = (step, sampler.state_dict(), False)  # until its optimizer step, a step can be abandoned
                micro_batch_stops.arm()
                torch.manual_seed(_step_seed(cfg.seed, step, d.rank))
                phase = _phase(cfg, step, trainer_state["switch_step"])
                if cfg.algo.algo == "dsrl" and step == trainer_state["switch_step"] and ref_model is not None:
                    # Full (gathered under ZeRO-3) actor weights; a tied LM head arrives through its embedding.
                    ref_model.load_state_dict(dict(updater.named_parameters_for_sync()), strict=False)
                batch = sampler.next_batch()
                mine = batch[d.rank * per_rank:(d.rank + 1) * per_rank]
                my_prompts = [prompts[i] for i in mine]
                # Seeds by global prompt index: vLLM samples each prompt alike on any number of ranks.
                seed = _step_seed(cfg.seed, step, 0) + d.rank * per_rank * cfg.rollout.n
                t_rollout = time.perf_counter()
                rollouts = engine.generate(my_prompts, _sampling(cfg, tokenizer, cfg.rollout.n, seed))
                stop.check()  # the HF engine cuts its generation short when asked to stop
                t_reward = time.perf_counter()
                texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
                rewards = reward_fn(texts, [problems[mine[r.prompt_index]].answer for r in rollouts])
                reward_counts = _reward_counts(reward_fn)
                for r, text, reward in list(zip(rollouts, texts, rewards))[:cfg.log_samples]:
                    sample_log.write(step, problems[mine[r.prompt_index]].prompt_text, text, reward)
                samples = collect_samples(my_prompts, rollouts, rewards, group_offset=d.rank * per_rank)
                lr = phase.lr * _lr_factor(cfg, step)
                t_update = time.perf_counter()
                ref_fn = None if ref_model is None else policy_logprob_fn(ref_model, phase.loss.temperature)
                outcome = run_batch(run_update, updater, samples, phase, step=step, marginal_prefix=prefix,
                                    max_tokens=cfg.optim.max_tokens_per_micro_batch, device=d.device, lr=lr,
                                    options=_update_options(cfg), critic=critic, ref_logprobs_fn=ref_fn,
                                    marginal_logprob=guard is not None and cfg.guard.max_logprob_drift is not None)
                result = outcome.update
                t_sync = time.perf_counter()
                if result.stepped:
                    engine.update_weights(updater.named_parameters_for_sync())
                t_end = time.perf_counter()
                metrics = _step_metrics(cfg, phase, samples, texts, result, lr, t_end - t0, trainer_state)
                metrics.update(reward_counts)
                metrics.update(_phase_times(samples, result, rollout_s=t_reward - t_rollout,
                                            reward_s=t_update - t_reward, update_s=t_sync - t_update,
                                            sync_s=t_end - t_sync))
                metrics.update(outcome.metrics)
                if cfg.algo.algo == "dsrl":
                    metrics["switch_step"] = trainer_state["switch_step"]
                if guard is not None and phase.space == "marginal":
                    signals = guard_signals(rollouts, metrics)
                    decision = guard.observe(signals)
                    trainer_state["guard"] = guard.state_dict()
                    metrics.update(guard=decision.reason, truncated_share=signals.truncated_share,
                                   marginal_logprob_drift=decision.logprob_drift)
                    if decision.switch and cfg.guard.action == "stop":
                        cfg = dataclasses.replace(cfg, steps=step + 1)  # the run ends after this step
                        metrics["guard_stop"] = step + 1
                        progress.end_at(step + 1)
                        print0(f"guard: the run stops after step {step} ({decision.reason})")
                    elif decision.switch:
                        trainer_state["switch_step"] = metrics["switch_step"] = step + 1
                        print0(f"guard: the marginal phase ends after step {step} ({decision.reason}); "
                               f"{phase.algo} -> {cfg.algo.after_switch} from step {step + 1}")
                note = None if result.stepped else outcome.skip_reason or _skip_reason(metrics, phase.samples)
                metrics["update_skipped"] = note
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    logger.log(step, {k: v for k, v in metrics.items() if v is not None})
                progress.update(step + 1, metrics["reward_mean"], metrics["tokens_per_s"],
                                note=f"no update: {note}" if note else None)
                done = step + 1
                # Evaluation before the checkpoint: a run killed in between redoes both after resuming.
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    point = (done, None, True)
                    periodic_eval(step)
                point = (done, None, False)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    last_checkpoint = checkpoint(done)
                if done < cfg.steps:
                    stop.check()
                if done >= cfg.steps:  # the guard stopped the run early
                    break
            progress.close()

            accuracy_after, after = evaluate(cfg, engine, tokenizer, reward_fn, eval_tasks, d, greedy=cfg.eval_greedy)
            stop.check()  # a cut evaluation: the resumed run (at the last step) evaluates again
            if len(eval_tasks) > 1 or cfg.eval_n > 1:
                print0("after RL: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in after.items()))
            final_eval = {"accuracy_after": accuracy_after, "eval_after": after}
            logger.log(cfg.steps - 1, final_eval_record("after", accuracy_after, after))
            final = checkpoint(cfg.steps)
            logger.close()
            sample_log.close()
            plot_path = write_plot(out, d.rank)
            summary = TrainSummary(trainer_state["accuracy_before"], accuracy_after, cfg.steps,
                                   time.perf_counter() - started, str(out), plot_path, str(final / "hf"),
                                   trainer_state.get("eval_before", {}), after)
            write_run_summary(out, d.rank, "finished", trainer_state, summary.seconds, steps=cfg.steps,
                              plot=plot_path, model=summary.checkpoint_path, **final_eval)
            return summary
        except Stopping as stopped:
            if point is None:  # before RL: nothing worth saving, resume=true starts over
                summary_path = write_run_summary(out, d.rank, "interrupted", trainer_state,
                                                 time.perf_counter() - started, steps_done=0)
                if summary_path is not None:
                    print0(f"summary : {summary_path}")
                raise RunInterrupted(stopped.signum, 0, None) from None
            done, sampler_state, eval_pending = point
            if sampler_state is not None:  # an abandoned step: its prompts are drawn again after resuming
                sampler.load_state_dict(sampler_state)
            if eval_pending:
                trainer_state["eval_pending"] = True
            if progress is not None:
                progress.close()
            if last_checkpoint is None or last_checkpoint.name != f"step_{done:06d}":
                last_checkpoint = checkpoint(done)
            for log in (logger, sample_log):
                if log is not None:
                    log.close()
            plot = write_plot(out, d.rank)
            summary_path = write_run_summary(out, d.rank, "interrupted", trainer_state, time.perf_counter() - started,
                                             steps_done=done, plot=plot)
            print_outputs(out, plot, summary_path)
            raise RunInterrupted(stopped.signum, done, str(last_checkpoint)) from None
        except OSError as exc:  # a full disk: end the bar, keep what can still be written, then report
            end_failed_run(out, d.rank, [progress, logger, sample_log], trainer_state, time.perf_counter() - started,
                           exc, final_eval)
            raise
        finally:
            if progress is not None:  # ends the bar's line before any error message
                progress.close()
            if engine is not None:
                engine.close()
            close = getattr(reward_fn, "close", None)
            if close is not None:
                close()
            if d.rank == 0:
                shutil.rmtree(out / VLLM_INIT_DIR, ignore_errors=True)
            if lock is not None:
                lock.release()


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    o = cfg.optim
    return lr_factor(step, cfg.steps, o.schedule, o.warmup_steps, o.min_lr_ratio)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _step_metrics(cfg: TrainConfig, phase: Phase, samples: Any, texts: list[str], result: Any, lr: float,
                  seconds: float, totals: dict[str, Any]) -> dict[str, Any]:
    """The metrics.jsonl row of one step (global over ranks); adds the step's fully solved / unsolved prompt groups
    to the running counts in `totals` (the checkpointed trainer state)."""
    n = cfg.rollout.n
    rewards = samples.rewards.view(-1, n)
    thoughts = count_thoughts(texts)
    lengths = [len(r) for r in samples.response_ids]
    prompt_tokens = sum(len(p) for p in samples.prompt_ids)
    sums = reduce_floats([
        float(rewards.sum()), float((rewards == 1).float().sum()), float(rewards.numel()), float(sum(lengths)),
        float((rewards == 1).all(dim=1).sum()), float((rewards < 1).all(dim=1).sum()), float(rewards.shape[0]),
        float(thoughts.transition), float(thoughts.reflection), float(thoughts.steps),
        float(prompt_tokens + sum(lengths)),
    ])
    total, correct, count, length, solved, unsolved, groups, transition, reflection, steps, tokens = sums
    for key, value in (("fully_solved_total", solved), ("fully_unsolved_total", unsolved)):
        totals[key] = totals.get(key, 0) + round(value)
    return {
        "space": phase.space,
        "samples": phase.samples,
        "algo": phase.algo,
        "reward_mean": total / count,
        "accuracy": correct / count,
        "response_len_mean": length / count,
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
