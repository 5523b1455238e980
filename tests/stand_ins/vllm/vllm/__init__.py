"""CPU stand-in for vllm (tests only): the names OpenRLHF imports at import time; using them raises."""

from __future__ import annotations

__version__ = "0.0.0+stand-in"


class SamplingParams:
    def __init__(self, *_: object, **__: object) -> None:
        raise RuntimeError("vllm stand-in: no vLLM engine in this environment")
