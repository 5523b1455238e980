"""Metrics JSONL logger, rank gating, optional TensorBoard/wandb sinks, the progress bar and the metrics plot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from typing import ClassVar

import numpy as np
import pytest
import torch

from dsrl_fast.train import metrics_log
from dsrl_fast.train.metrics_log import MetricsLogger, StepProgress, print0, read_metrics
from dsrl_fast.train.plot import _find_switch, _merge_steps, _phase_labels, moving_average, panels_of, plot_metrics


@pytest.fixture
def rank(monkeypatch):
    """Call rank(r) to make torch.distributed look initialized with this process at rank r."""
    def set_rank(r: int) -> None:
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: r)
    monkeypatch.delenv("RANK", raising=False)
    return set_rank


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_writes_and_flushes_each_line(tmp_path):
    logger = MetricsLogger(tmp_path / "run")
    logger.log(0, {"reward_mean": 0.25, "space": "marginal", "fully_solved": np.int64(3), "lr": np.float32(0.5)})
    logger.log(1, {"reward_mean": float("nan"), "loss": float("inf"), "grad_norm": np.float32("-inf")})
    records = lines(tmp_path / "run" / "metrics.jsonl")  # read while the logger is still open
    assert records[0] == {"step": 0, "reward_mean": 0.25, "space": "marginal", "fully_solved": 3, "lr": 0.5}
    # strict JSON: non-finite values are null, never a bare NaN/Infinity token
    assert next(iter(records[0])) == "step" and records[1] == {"step": 1, "reward_mean": None, "loss": None,
                                                               "grad_norm": None}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON constant {token} in {line!r}"))
    logger.close()
    logger.close()
    with pytest.raises(RuntimeError, match="after close"):
        logger.log(2, {})


def test_log_validates(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
            logger.log(-1, {})
        with pytest.raises(ValueError, match="step must be an int >= 0, got True"):
            logger.log(True, {})
        with pytest.raises(TypeError, match=r"metrics\['loss'\] must be an int, float or str .*got Tensor"):
            logger.log(0, {"loss": torch.tensor([1.0, 2.0])})
        with pytest.raises(ValueError, match=r"metrics\['step'\] must equal step=3"):
            logger.log(3, {"step": 4})
        with pytest.raises(TypeError, match="metrics must be a dict"):
            logger.log(0, [("a", 1)])
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_fresh_run_replaces_and_resume_appends(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(0, {"a": 1})
    with MetricsLogger(tmp_path) as logger:
        logger.log(5, {"a": 2})
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [5]
    with MetricsLogger(tmp_path, resume=True) as logger:
        logger.log(6, {"a": 3})
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [5, 6]


def test_truncate_after(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(10):
            logger.log(step, {"reward_mean": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "rew')  # a line cut by a kill
    with MetricsLogger(tmp_path, resume=True) as logger:
        assert logger.truncate_after(6) == 5
        logger.log(6, {"reward_mean": -1.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6] and records[-1]["reward_mean"] == -1.0
    with MetricsLogger(tmp_path, resume=True) as logger:
        assert logger.truncate_after(0) == 7
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_non_zero_rank_writes_nothing(tmp_path, rank, capsys):
    rank(1)
    with MetricsLogger(tmp_path / "run", wandb_project="p", tensorboard=True) as logger:
        logger.log(0, {"a": 1})
        assert logger.truncate_after(0) == 0
    assert not (tmp_path / "run").exists()
    print0("hidden")
    StepProgress(10).update(1, 0.5, 100.0)
    assert capsys.readouterr() == ("", "")
    rank(0)
    print0("shown", 3)
    assert capsys.readouterr().out == "shown 3\n"


def test_launcher_rank_before_init(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "2")
    assert not metrics_log.is_rank0()
    MetricsLogger(tmp_path / "run").log(0, {"a": 1})
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, wandb_project="proj")


class FakeWriter:
    instances: ClassVar[list[FakeWriter]] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.texts, self.closed = log_dir, purge_step, [], [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def add_text(self, tag, text):
        self.texts.append(tag)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_sink(tmp_path, monkeypatch):
    FakeWriter.instances = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    with MetricsLogger(tmp_path, tensorboard=True, config_dict={"steps": 3}) as logger:
        logger.log(0, {"reward_mean": 0.5, "space": "marginal", "loss": float("inf")})
        logger.truncate_after(0)
    first, second = FakeWriter.instances
    assert first.scalars == [("reward_mean", 0.5, 0)] and first.texts == ["config"] and first.closed
    assert first.log_dir.endswith("tensorboard") and second.purge_step == 0 and second.closed


def test_wandb_sink_and_resume_id(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(tmp_path, wandb_project="proj", config_dict={"steps": 3}) as logger:
        logger.log(4, {"reward_mean": 0.5, "space": "marginal"})
    with MetricsLogger(tmp_path, wandb_project="proj", resume=True):
        pass
    init1, log, finish, init2, _ = calls
    assert init1[1]["project"] == "proj" and init1[1]["config"] == {"steps": 3}
    assert log == ("log", {"reward_mean": 0.5}, 4) and finish == ("finish",)
    assert init2[1]["id"] == init1[1]["id"] and init2[1]["resume"] == "allow"


def test_step_progress(capsys, rank):
    rank(0)
    with StepProgress(total=5, initial=1) as bar:
        assert bar.n == 1
        bar.update(2, 0.5, 1234.0)
        bar.update(4, 0.25, 99.0)
        assert bar.n == 4
        with pytest.raises(ValueError, match=r"step must be an int >= 1 \(steps done\), got 0"):
            bar.update(0, 0.5, 1.0)
    err = capsys.readouterr().err
    assert "4/5" in err and "reward=0.250" in err and "tok_s=99" in err
    with StepProgress(total=10) as bar:
        bar.update(3, 0.5, 1.0)
        bar.end_at(3)
        with pytest.raises(ValueError, match=r"total must be an int >= the steps done \(3\), got 2"):
            bar.end_at(2)
    assert "3/3" in capsys.readouterr().err
    with StepProgress(total=5, enabled=False) as bar:
        bar.update(1, 0.5, 1.0)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match=r"initial must be an int in \[0, total=5\], got 6"):
        StepProgress(total=5, initial=6)


def test_moving_average_matches_naive():
    values = np.random.default_rng(0).normal(size=23)
    for window in (1, 4, 10, 50):
        naive = [values[max(0, i - window + 1):i + 1].mean() for i in range(len(values))]
        np.testing.assert_allclose(moving_average(values, window), naive, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        moving_average(values, 0)


def _write_run(path, steps, switch):
    rng = np.random.default_rng(0)
    with MetricsLogger(path) as logger:
        for step in range(steps):
            marginal = step < switch
            logger.log(step, {
                "space": "marginal" if marginal else "conditional", "samples": "negative" if marginal else "all",
                "reward_mean": 0.3 + 0.4 * step / steps + rng.uniform(-0.15, 0.15), "accuracy": 0.3 + step / 400,
                "response_len_mean": 12.0 + rng.uniform(-1, 1), "transition_share": rng.uniform(0, 0.2),
                "reflection_share": rng.uniform(0, 0.3), "loss": 0.1,
            })
    return path / "metrics.jsonl"


def _png_height(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[20:24], "big")


def test_plot_with_switch_and_single_line(tmp_path):
    metrics = _write_run(tmp_path / "run", steps=60, switch=20)
    rows = read_metrics(metrics)
    assert _find_switch(rows) == 20
    assert _phase_labels(rows, 20) == ("NSR-PreRL (marginal)", "GRPO (conditional)")
    rows[20]["algo"] = "dr_grpo"
    assert _phase_labels(rows, 20) == ("NSR-PreRL (marginal)", "Dr.GRPO (conditional)")
    full = plot_metrics(metrics, tmp_path / "out" / "curves.png", window=5)
    assert full == str(tmp_path / "out" / "curves.png")

    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"step": 0, "reward_mean": 0.3}) + "\n")
    single = plot_metrics(one, tmp_path / "one.png", switch_step=3)
    assert _png_height(tmp_path / "one.png") * 2 < _png_height(tmp_path / "out" / "curves.png")
    assert single.endswith("one.png")

    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"step": 0, "note": "x"}\n{"step": 1, "note": "y", "loss": 1.0}\n')
    assert plot_metrics(odd, tmp_path / "odd.png").endswith("odd.png")


def test_merge_steps_keeps_training_metrics_next_to_eval():
    records = [{"step": 1, "reward_mean": 0.5}, {"step": 0, "reward_mean": 0.1}, {"step": 1, "eval_accuracy": 0.7},
               {"step": "x"}, {"reward_mean": 9.0}]
    assert _merge_steps(records) == [{"step": 0, "reward_mean": 0.1},
                                     {"step": 1, "reward_mean": 0.5, "eval_accuracy": 0.7}]


def test_plot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        plot_metrics(tmp_path / "missing.jsonl", tmp_path / "x.png")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    with pytest.raises(ValueError, match="holds no record with an integer 'step'"):
        plot_metrics(empty, tmp_path / "x.png")
    with pytest.raises(TypeError, match="switch_step must be an int or None, got str"):
        plot_metrics(empty, tmp_path / "x.png", switch_step="20")


def test_panels_cover_loss_grad_norm_lr_and_held_out_accuracy():
    rows = [{"step": 0, "reward_mean": 0.1, "loss": 0.5, "grad_norm": 1.0, "lr": 1e-5, "accuracy": 0.05},
            {"step": 1, "reward_mean": 0.2, "loss": None, "grad_norm": 0.8, "lr": 1e-4, "eval_accuracy": 0.3,
             "truncated_share": 0.25}]
    assert panels_of(rows) == [("training reward", ["reward_mean", "accuracy"]),
                               ("held-out accuracy", ["eval_accuracy"]),
                               ("share of responses cut by the length cap", ["truncated_share"]),
                               ("loss", ["loss"]), ("gradient norm", ["grad_norm"]), ("learning rate", ["lr"])]


def test_panels_leave_out_a_repeated_accuracy_and_shares_without_signal():
    """A 0/1 reward makes the sampled accuracy the reward's own curve, and the toy's one-line answers have no
    reasoning steps to classify: neither gets a curve; the same keys with a signal do."""
    flat = [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.1 * s, "transition_share": 0.0,
             "reflection_share": 0.0, "truncated_share": 0.0, "response_len_mean": 12.0} for s in range(4)]
    assert panels_of(flat) == [("training reward", ["reward_mean"]), ("response length (tokens)",
                                                                      ["response_len_mean"])]
    graded = [dict(r, accuracy=0.05 * r["step"], reflection_share=0.1 if r["step"] == 2 else 0.0) for r in flat]
    assert panels_of(graded) == [("training reward", ["reward_mean", "accuracy"]),
                                 ("response length (tokens)", ["response_len_mean"]),
                                 ("share of reasoning steps", ["reflection_share"])]


def test_held_out_accuracy_is_drawn_before_rl_at_every_evaluation_and_after_rl(tmp_path, monkeypatch):
    """The trainer logs the evaluation before RL in a record of step 0, periodic ones after their step and the one
    after RL in a record of the last step: the plot draws them as one line, before RL at step -1."""
    from matplotlib.figure import Figure

    records = [{"step": 0, "eval_accuracy_before": 0.25, "eval_before/held_out/avg@4": 0.25,
                "eval_before/held_out/pass@1": 0.25, "eval_before/held_out/pass@4": 0.6}]
    records += [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.1 * s} for s in range(6)]
    records += [{"step": 2, "eval_accuracy": 0.4, "eval/held_out/pass@4": 0.7},
                {"step": 5, "eval_accuracy_after": 0.55, "eval_after/held_out/pass@4": 0.75}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), real_savefig(fig, *a, **k))[1])
    plot_metrics(path, tmp_path / "training.png")
    (ax,) = [a for a in drawn[0].axes if a.get_ylabel() == "held-out accuracy"]
    passes, line = ax.get_lines()
    assert list(line.get_xdata()) == [-1, 2, 5] and list(line.get_ydata()) == [0.25, 0.4, 0.55]
    assert passes.get_label() == "held-out pass@4"
    assert list(passes.get_xdata()) == [-1, 2, 5] and list(passes.get_ydata()) == [0.6, 0.7, 0.75]
    ylabels = [a.get_ylabel() for a in drawn[0].axes if a.axison]
    assert ylabels == ["training reward", "held-out accuracy"], "the accuracy repeats the reward: no panel of its own"
    assert [t.get_text() for t in ax.texts] == ["before RL 0.250", "after RL 0.550"]
    assert ax.get_xlim()[0] < -1, "the point before RL is inside the axes"


def test_write_summary_is_strict_json_and_atomic(tmp_path, monkeypatch):
    path = metrics_log.write_summary(tmp_path, {"status": "finished", "loss": float("nan"), "eval": {"a": math.inf}})
    assert json.loads(path.read_text()) == {"status": "finished", "loss": None, "eval": {"a": None}}
    monkeypatch.setattr(metrics_log.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        metrics_log.write_summary(tmp_path, {"status": "failed"})
    assert json.loads(path.read_text())["status"] == "finished", "a failed write keeps the previous summary"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    with pytest.raises(TypeError, match="summary must be a dict, got list"):
        metrics_log.write_summary(tmp_path, [])
