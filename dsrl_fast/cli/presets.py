"""`dsrl-fast presets`: the shipped run presets, each with its whole description."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from pathlib import Path

from dsrl_fast.train.config import list_presets, preset_path

_WIDTH = 100


def add_presets_parser(sub: argparse._SubParsersAction,
                       add_debug: Callable[[argparse.ArgumentParser, object], None]) -> None:
    """The `presets` subcommand."""
    presets = sub.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(handler=_presets)
    add_debug(presets, argparse.SUPPRESS)


def _presets(args: argparse.Namespace) -> int:
    del args
    for name in list_presets():
        print(name)
        for line in textwrap.wrap(preset_description(preset_path(name)), width=_WIDTH):
            print(f"    {line}")
    print("use: dsrl-fast train --preset NAME data.train_path=... [key=value ...]")
    return 0


def preset_description(path: str) -> str:
    """The preset's description: its leading comment paragraph (up to the first bare '#' or non-comment line),
    joined into one line."""
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#") or not text.lstrip("#").strip():
            break
        words.append(text.lstrip("#").strip())
    return " ".join(words)
