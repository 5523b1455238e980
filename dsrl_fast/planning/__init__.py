"""`dsrl-fast plan`: will a training run fit? Per-GPU memory estimates from the real architecture on the meta device."""

from dsrl_fast.planning.memory import MemoryItem, MemoryPlan, plan_memory
from dsrl_fast.planning.report import format_plan, parse_memory
from dsrl_fast.planning.simulate import LossWorkspace, micro_batch_peak

__all__ = ["LossWorkspace", "MemoryItem", "MemoryPlan", "format_plan", "micro_batch_peak", "parse_memory",
           "plan_memory"]
