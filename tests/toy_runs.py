"""Small trainer runs on the embedded toy task, shared by the end-to-end test modules.

The runs are kept small (4 steps, 4 prompts x 8 rollouts, 16 held-out problems) and use the 10..19 toy range, where
100 supervised steps reach ~20% sampled accuracy, so groups mix right and wrong answers and every phase trains. They
pin what the demo's own settings would change: a fixed-length warm-up (no accuracy target, whose check needs more
training problems than 84), one response per held-out problem and no periodic evaluation.
"""

from __future__ import annotations

from pathlib import Path

from dsrl_fast.train.config import load_config
from dsrl_fast.train.trainer import TrainSummary, train

BASE = (
    "steps=4", "algo.switch_step=2", "prompts_per_step=4", "rollout.n=8", "checkpoint_every=2", "progress=false",
    "sft.steps=100", "sft.batch_size=16", "data.toy_low=10", "data.toy_high=19", "data.toy_train_size=84",
    "data.eval_size=16", "sft.target_accuracy=null", "eval_n=1", "eval_every=0",
)


def run(output_dir: Path, *overrides: str) -> TrainSummary:
    """The toy run of BASE in `output_dir`, with `overrides` applied after it."""
    return train(load_config(None, [*BASE, f"output_dir={output_dir}", *overrides]))
