"""dsrl_fast: fused kernels, packed dual-space batches and a lean trainer for Dual Space RL.

Importing the package needs only PyTorch; Triton is imported when a Triton path first runs.
"""

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.loss.logprobs import LogProbs, linear_logprobs
from dsrl_fast.model.packed import response_logprobs
from dsrl_fast.data.packing import PackedBatch, build_micro_batches, pack, unpack
from dsrl_fast.loss.policy_loss import policy_loss
from dsrl_fast.loss.token_loss import PolicyLossOutput, token_policy_loss

__all__ = [
    "LogProbs",
    "PolicyLossConfig",
    "PackedBatch",
    "PolicyLossOutput",
    "build_micro_batches",
    "linear_logprobs",
    "pack",
    "policy_loss",
    "response_logprobs",
    "token_policy_loss",
    "unpack",
]
