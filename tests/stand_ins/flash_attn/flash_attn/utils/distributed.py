"""CPU stand-in for flash_attn.utils.distributed (tests only): ring attention is not run on CPU."""

from __future__ import annotations


def all_gather(*_: object, **__: object) -> None:
    raise RuntimeError("flash_attn stand-in: all_gather (ring attention) is not available on CPU")
