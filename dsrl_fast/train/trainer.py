"""The DSRL training loop: rollouts → rewards → advantages → packed fused-loss updates → weight sync.

Runs as a plain process, under `torchrun` or under the `deepspeed` launcher (data parallel: each rank rolls out
its share of the step's prompts; every group of n rollouts stays on one rank). Each step draws its randomness from
(seed, step, rank), and the prompt sampler's position is checkpointed, so a resumed run repeats no step and loses
none. The stages live in dsrl_fast/train/run.py (open, start, evaluate, close) and dsrl_fast/train/step.py (one step).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from dsrl_fast.errors import RunInterrupted
from dsrl_fast.interrupt import StopRequest, Stopping
from dsrl_fast.train.config import TrainConfig
from dsrl_fast.train.metrics_log import print0
from dsrl_fast.train.run import close_run, evaluate_during, open_run, start_rl
from dsrl_fast.train.run_report import end_failed_run, final_eval_record, print_outputs, write_plot, write_run_summary
from dsrl_fast.train.run_state import Run
from dsrl_fast.train.step import evaluate, rl_step


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

    summary.json (rank 0) holds ``status`` ("finished", "interrupted" or "failed" with ``error``), ``warmup_steps`` and
    ``warmup_accuracy`` (the supervised warm-up's steps and its last check, null when not run or not checked),
    ``accuracy_before`` / ``accuracy_after``, ``eval_before`` / ``eval_after`` (every "eval/<set>/<metric>" of the
    evaluations before and after RL), ``seconds``, ``checkpoint`` (the newest complete one), ``metrics``, ``plot``,
    and ``steps`` / ``model`` (finished) or ``steps_done`` (interrupted).
    """
    run = open_run(cfg)  # rank 0 holds output_dir's run lock until close_run
    with StopRequest() as stop:
        try:
            start_rl(run, stop)
            for step in range(run.start_step, run.cfg.steps):
                metrics = rl_step(run, stop, step)
                _log_step(run, step, metrics)
                done = step + 1
                # Evaluation before the checkpoint: a run killed in between redoes both after resuming.
                if run.cfg.eval_every and done % run.cfg.eval_every == 0 and done < run.cfg.steps:
                    run.stop_point = (done, None, True)
                    evaluate_during(run, stop, step)
                run.stop_point = (done, None, False)
                if run.cfg.checkpoint_every and done % run.cfg.checkpoint_every == 0 and done < run.cfg.steps:
                    run.checkpoint(done)
                if done >= run.cfg.steps:  # the last step, or the guard ended the run early
                    break
                stop.check()
            return _finish(run, stop)
        except Stopping as stopped:
            raise _save_interrupted(run, stopped) from None
        except OSError as exc:  # a full disk: end the bar, keep what can still be written, then report
            end_failed_run(run.out, run.d.rank, [run.progress, run.logger, run.sample_log], run.state,
                           time.perf_counter() - run.started, exc, run.final_eval)
            raise
        finally:
            close_run(run)


def _log_step(run: Run, step: int, metrics: dict[str, Any]) -> None:
    """Write the step's metrics (every log_every steps and the last) and advance the progress bar."""
    assert run.logger is not None and run.progress is not None and run.cfg.steps is not None
    if step % run.cfg.log_every == 0 or step == run.cfg.steps - 1:
        run.logger.log(step, {k: v for k, v in metrics.items() if v is not None})
    note = metrics["update_skipped"]
    run.progress.update(step + 1, metrics["reward_mean"], metrics["tokens_per_s"],
                        note=f"no update: {note}" if note else None)


def _finish(run: Run, stop: StopRequest) -> TrainSummary:
    """Evaluate after RL, save the final checkpoint, the plot and summary.json."""
    assert run.progress is not None and run.logger is not None and run.sample_log is not None
    steps = run.cfg.steps
    assert steps is not None
    run.progress.close()
    accuracy_after, after = evaluate(run)
    stop.check()  # a cut evaluation: the resumed run (at the last step) evaluates again
    if len(run.eval_tasks) > 1 or run.cfg.eval_n > 1:
        print0("after RL: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in after.items()))
    run.final_eval = {"accuracy_after": accuracy_after, "eval_after": after}
    run.logger.log(steps - 1, final_eval_record("after", accuracy_after, after))
    final = run.checkpoint(steps)
    run.logger.close()
    run.sample_log.close()
    plot_path = write_plot(run.out, run.d.rank)
    summary = TrainSummary(run.state["accuracy_before"], accuracy_after, steps, time.perf_counter() - run.started,
                           str(run.out), plot_path, str(final / "hf"), run.state.get("eval_before", {}), after)
    write_run_summary(run.out, run.d.rank, "finished", run.state, summary.seconds, steps=steps, plot=plot_path,
                      model=summary.checkpoint_path, **run.final_eval)
    return summary


def _save_interrupted(run: Run, stopped: Stopping) -> RunInterrupted:
    """After a stop request: before RL nothing is saved; else the checkpoint of the finished steps (an abandoned
    step's prompts are drawn again, a cut evaluation is flagged to be redone), the plot and summary.json."""
    if run.stop_point is None:  # before RL: nothing worth saving, resume=true starts over
        summary_path = write_run_summary(run.out, run.d.rank, "interrupted", run.state,
                                         time.perf_counter() - run.started, steps_done=0)
        if summary_path is not None:
            print0(f"summary : {summary_path}")
        return RunInterrupted(stopped.signum, 0, None)
    assert run.sampler is not None
    done, sampler_state, eval_pending = run.stop_point
    if sampler_state is not None:  # an abandoned step: its prompts are drawn again after resuming
        run.sampler.load_state_dict(sampler_state)
    if eval_pending:
        run.state["eval_pending"] = True
    if run.progress is not None:
        run.progress.close()
    if run.last_checkpoint is None or run.last_checkpoint.name != f"step_{done:06d}":
        run.checkpoint(done)
    for log in (run.logger, run.sample_log):
        if log is not None:
            log.close()
    plot = write_plot(run.out, run.d.rank)
    summary_path = write_run_summary(run.out, run.d.rank, "interrupted", run.state,
                                     time.perf_counter() - run.started, steps_done=done, plot=plot)
    print_outputs(run.out, plot, summary_path)
    return RunInterrupted(stopped.signum, done, str(run.last_checkpoint))
