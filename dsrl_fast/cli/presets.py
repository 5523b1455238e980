"""`dsrl-fast presets`: the shipped run presets, one line each."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dsrl_fast.train.config import list_presets, preset_path


def add_presets_parser(sub: argparse._SubParsersAction,
                       add_debug: Callable[[argparse.ArgumentParser, object], None]) -> None:
    """The `presets` subcommand."""
    presets = sub.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(handler=_presets)
    add_debug(presets, argparse.SUPPRESS)


def _presets(args: argparse.Namespace) -> int:
    del args
    for name in list_presets():
        first = Path(preset_path(name)).read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        print(f"{name:<20} {first}")
    print("use: dsrl-fast train --preset NAME data.train_path=... [key=value ...]")
    return 0
