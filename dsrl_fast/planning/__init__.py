"""`dsrl-fast plan`: will a training run fit? Per-GPU memory estimates from the real architecture on the meta device,
vLLM's KV-cache capacity against a step's rollouts, and the changes that make a run fit."""

from dsrl_fast.planning.fixes import Fix, find_fixes
from dsrl_fast.planning.memory import MemoryItem, MemoryPlan, plan_memory
from dsrl_fast.planning.report import format_plan
from dsrl_fast.planning.request import PlanRequest
from dsrl_fast.planning.simulate import LossWorkspace, micro_batch_peak
from dsrl_fast.planning.units import parse_memory
from dsrl_fast.planning.vllm import VllmReserves, VllmShare, kv_bytes_per_token

__all__ = ["Fix", "LossWorkspace", "MemoryItem", "MemoryPlan", "PlanRequest", "VllmReserves", "VllmShare",
           "find_fixes", "format_plan", "kv_bytes_per_token", "micro_batch_peak", "parse_memory", "plan_memory"]
