"""The toy benchmarks' shared starting data: the prompt template and the train/held-out problem files the trainer
reads (`data.train_path`, `data.template`) from a saved warm-up (bench.algorithms_toy, bench.paper_toy)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsrl_fast.data.problems import Problem

TEMPLATE = "<bos>{problem}"  # the toy's prompt: BOS, then the problem text (the warm-up's encoding)


def write_splits(root: Path, problems: Sequence[Problem], train_size: int) -> None:
    """root/train.jsonl (the first `train_size` problems) and root/eval.jsonl (the rest), one
    {"problem", "answer"} object per line."""
    root.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", problems[:train_size]), ("eval", problems[train_size:])):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for p in part:
                f.write(json.dumps({"problem": p.prompt_text, "answer": p.answer}) + "\n")
