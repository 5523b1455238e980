"""The stages of a training run around its steps: open it (checks, output directory, data, model), start RL (engine,
warm-up, optimizer, resume, the evaluation before RL, logs), evaluate during RL, finish, save what a stop leaves,
and release everything."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsrl_fast.data.problems import PromptSampler
from dsrl_fast.errors import UserError
from dsrl_fast.eval.periodic import HELD_OUT, EvalTask, evaluate_tasks, load_benchmarks
from dsrl_fast.interrupt import MicroBatchStops, StopRequest
from dsrl_fast.model.packed import prepare_packed_model
from dsrl_fast.model.saving import save_hf_model
from dsrl_fast.reward import get_reward_fn
from dsrl_fast.rl.guard import MarginalGuard
from dsrl_fast.distributed import reduce_floats
from dsrl_fast.train.checkpoint import latest_checkpoint, load_checkpoint, load_reference
from dsrl_fast.train.components import (
    Dist,
    build_critic,
    build_engine,
    build_updater,
    frozen_copy,
    init_distributed,
)
from dsrl_fast.train.config import TrainConfig, config_to_dict, save_config
from dsrl_fast.train.critic import load_critic
from dsrl_fast.train.metrics_log import MetricsLogger, SampleLog, StepProgress, print0
from dsrl_fast.train.resume_check import ResumePlan, check_resume, record_resume
from dsrl_fast.train.run_dir import SFT_DIR, VLLM_INIT_DIR, RunLock, lock_output_dir, prepare_output_dir
from dsrl_fast.train.run_report import final_eval_record
from dsrl_fast.train.run_state import Run
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
from dsrl_fast.train.step import evaluate, sampling
from dsrl_fast.train.updaters import PolicyModule

WARMUP_CHECK = "warm-up check"


def open_run(cfg: TrainConfig) -> Run:
    """Check everything checkable before the model loads (UserError), take output_dir's run lock (rank 0, held until
    `close_run`), tokenize the problems and build the model and the reward."""
    started = time.perf_counter()
    d = init_distributed()
    check_requirements(cfg, d.world_size)
    problems, held_out = load_train_eval_problems(cfg)
    benchmarks = load_benchmarks(cfg.eval_benchmarks, limit=cfg.data.eval_size)
    cfg = resolve_run_length(cfg, len(problems))
    check_model(cfg)
    resume_from, lock, resume_plan = claim_output_dir(cfg, d)
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
    return Run(cfg, d, Path(cfg.output_dir), started, lock, resume_from, resume_plan, tokenizer, problems, prompts,
               eval_tasks, tuple(prefix), model, reward_fn, last_checkpoint=resume_from)


def claim_output_dir(cfg: TrainConfig, d: Dist) -> tuple[Path | None, RunLock | None, ResumePlan | None]:
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


def start_rl(run: Run, stop: StopRequest) -> None:
    """Build the engine, run the supervised warm-up (a fresh toy run), build the optimizer (and the reference and
    critic), restore a checkpoint, record the config, evaluate before RL (a fresh run) and open the logs."""
    cfg, d, out = run.cfg, run.d, run.out
    stop.action = "stopping (nothing is saved before RL starts; resume=true starts over)" \
        if run.resume_from is None else "stopping at the next check point"
    run.engine = build_engine(cfg, run.model, run.tokenizer, should_stop=lambda: stop.requested)
    if run.resume_from is None and cfg.sft.steps > 0:
        _warm_up(run, stop)

    # The optimizer; the reference is copied before it exists: under ZeRO-3 the model's tensors are partitioned after.
    prepare_packed_model(run.model, attention_backend=cfg.model.attention_backend, use_liger=cfg.model.use_liger)
    run.ref_model = frozen_copy(run.model) if cfg.algo.kl_coef > 0 or cfg.algo.kl_in_reward_coef > 0 else None
    run.critic = build_critic(cfg, run.model, d.world_size)
    run.updater = build_updater(cfg, PolicyModule(run.model), d.world_size)
    run.updater.stops = run.micro_batch_stops = MicroBatchStops(stop)
    if run.critic is not None:
        run.critic.updater.stops = run.micro_batch_stops
    run.sampler = PromptSampler(len(run.problems), cfg.prompts_per_step, seed=cfg.seed, drop_last=cfg.epochs is not None)

    # Continue a checkpoint, or record the config and measure the starting point.
    if run.resume_from is not None:
        _resume(run)
    run.state.setdefault("switch_step", cfg.algo.switch_step)
    run.guard = MarginalGuard(cfg.guard) if cfg.guard.enabled else None
    if run.guard is not None:
        run.guard.load_state_dict(run.state.get("guard", {}))
    if run.resume_plan is not None:  # only now: a refused or failed resume leaves the previous config in place
        record_resume(cfg, run.resume_plan)
    elif d.rank == 0:
        save_config(cfg, out / "config.yaml")
    if run.resume_from is None:
        _evaluate_before(run, stop)

    run.logger = MetricsLogger(out, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                               config_dict=config_to_dict(cfg), resume=run.resume_from is not None)
    run.sample_log = SampleLog(out, resume_step=run.start_step if run.resume_from is not None else None)
    if run.resume_from is not None:
        run.logger.truncate_after(run.start_step)
    if run.resume_from is None or run.start_step == 0:  # a stop in step 0 checkpoints step 0, before this record
        run.logger.log(0, final_eval_record("before", run.state.get("accuracy_before"),
                                            run.state.get("eval_before", {})))
    assert cfg.steps is not None
    run.progress = StepProgress(cfg.steps, run.start_step, enabled=cfg.progress)

    stop.action = "abandoning the current step (or evaluation) and saving a checkpoint of the finished steps"
    if run.state.pop("eval_pending", False):  # a stop cut the evaluation after step start_step - 1
        run.stop_point = (run.start_step, None, True)
        evaluate_during(run, stop, run.start_step - 1)
        run.checkpoint(run.start_step)  # without the flag: a later resume must not evaluate again
    run.stop_point = (run.start_step, None, False)


def evaluate_during(run: Run, stop: StopRequest, step: int) -> None:
    """The evaluation after `step`, logged at that step; a generation cut short raises Stopping (the resumed run
    evaluates again)."""
    assert run.logger is not None
    accuracy, results = evaluate(run)
    stop.check()
    if accuracy is not None:
        results["eval_accuracy"] = accuracy
    if results:
        run.logger.log(step, {"step": step, **results})


def close_run(run: Run) -> None:
    """End the progress bar's line, close the engine and the reward, remove the vLLM export, release the lock."""
    if run.progress is not None:  # ends the bar's line before any error message
        run.progress.close()
    if run.engine is not None:
        run.engine.close()
    close = getattr(run.reward_fn, "close", None)
    if close is not None:
        close()
    if run.d.rank == 0:
        shutil.rmtree(run.out / VLLM_INIT_DIR, ignore_errors=True)
    if run.lock is not None:
        run.lock.release()


def load_sampler_state(sampler: PromptSampler, state: dict[str, Any]) -> None:
    """Continue the checkpoint's data order; UserError when an allowed config change altered the training set."""
    if state.get("n") != sampler.n:
        raise UserError(f"resume=true needs the checkpoint's {state.get('n')} training problems, got {sampler.n}: "
                        "the data settings changed (resume_changes=allow cannot change the training set); resume "
                        "with the saved data settings or start a new run in another output_dir")
    sampler.load_state_dict(state)


def describe_accuracy(name: str, accuracy: float | None) -> str:
    """The line train prints for the held-out accuracy `name` ("before RL", ...)."""
    if accuracy is not None:
        return f"held-out accuracy {name}: {accuracy:.3f}"
    return f"held-out accuracy {name}: not measured (no held-out problems: set data.eval_path)"


def _warm_up(run: Run, stop: StopRequest) -> None:
    """The toy task's supervised warm-up; rank 0 saves its model as the "before RL" model for `dsrl-fast eval`."""
    from dsrl_fast.data.toy import sft_target
    from dsrl_fast.data.toy_corrections import correction_target
    from dsrl_fast.train.warmup import supervised_warmup

    cfg, out, sft = run.cfg, run.out, run.cfg.sft
    assert run.engine is not None
    problems, measure = run.problems, None
    goal = f"until a check reaches accuracy {sft.target_accuracy:g}, at most" if sft.target_accuracy else "of"
    print0(f"supervised warm-up {goal} {sft.steps} steps (batch {sft.batch_size}, lr {sft.lr:g})")
    if sft.target_accuracy is not None:
        if sft.eval_size >= len(problems):
            raise UserError(f"sft.eval_size must be < the {len(problems)} training problems (the warm-up checks on "
                            f"problems it does not train on), got {sft.eval_size}")
        problems = problems[:-sft.eval_size]
        measure = _warmup_measure(run)
    target = correction_target if cfg.data.toy_task == "corrections" else sft_target
    result = supervised_warmup(run.model, run.tokenizer, problems, sft, seed=cfg.seed, measure=measure,
                               should_stop=lambda: stop.requested, target=target)
    stop.check()
    if run.d.rank == 0:
        save_hf_model(run.model, run.tokenizer, out / SFT_DIR)
    run.state["sft_steps"] = result.steps
    if result.checks:
        run.state["sft_accuracy"] = result.checks[-1][1]
    outcome = ""
    if result.reached is False:
        outcome = f"; the target {sft.target_accuracy:g} was not reached (last check {result.checks[-1][1]:.3f})"
    print0(f"supervised warm-up: {result.steps} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"
           f"{outcome}; model saved to {out / SFT_DIR}")
    run.engine.update_weights(run.model.state_dict().items())


def _warmup_measure(run: Run) -> Callable[[], float]:
    """The warm-up's check: accuracy of one response per problem on the last sft.eval_size training problems,
    decoded like the held-out evaluation with a fixed seed (the engine forks the RNG: the run's streams are left
    alone); the weights are synced to the engine first (a no-op for the HF engine)."""
    cfg = run.cfg
    assert run.engine is not None
    k = cfg.sft.eval_size
    task = EvalTask(WARMUP_CHECK, run.problems[-k:], run.prompts[-k:])
    params = sampling(cfg, run.tokenizer, 1, cfg.seed + 29, cfg.eval_greedy)

    def measure() -> float:
        assert run.engine is not None
        run.engine.update_weights(run.model.state_dict().items())
        metrics = evaluate_tasks(run.engine, run.tokenizer, [task], run.reward_fn, sampling=params,
                                 rank=run.d.rank, world_size=run.d.world_size, reduce=reduce_floats)
        return metrics[f"{WARMUP_CHECK}/avg@1"]

    return measure


def _resume(run: Run) -> None:
    """Load the checkpoint's weights, optimizer, trainer and sampler state (and reference, critic) and sync the
    engine."""
    assert run.resume_from is not None and run.updater is not None and run.sampler is not None
    assert run.engine is not None
    run.state = load_checkpoint(run.resume_from, run.updater)
    load_sampler_state(run.sampler, run.state["sampler"])
    run.start_step = run.state["step"]
    if run.ref_model is not None:
        load_reference(run.resume_from, run.ref_model)
    if run.critic is not None:
        load_critic(run.resume_from, run.critic.updater)
    run.engine.update_weights(run.updater.named_parameters_for_sync())
    print0(f"resumed from {run.resume_from} at step {run.start_step}")


def _evaluate_before(run: Run, stop: StopRequest) -> None:
    run.state["accuracy_before"], before = evaluate(run)
    run.state["eval_before"] = before
    stop.check()  # a generation cut short makes the figures meaningless
    print0(describe_accuracy("before RL", run.state["accuracy_before"]))
    if len(run.eval_tasks) > 1 or run.cfg.eval_n > 1:
        print0("before RL: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in before.items()))
