"""One planning request: a config source with overrides and the hardware, planned and re-planned with more overrides.

The CLI builds one from its arguments, the fixes (dsrl_fast.planning.fixes) re-plan it with extra overrides, and
`optim.max_tokens_per_micro_batch=auto` (dsrl_fast.planning.auto) plans the training launch it is part of.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

from dsrl_fast.planning.memory import DEFAULT_RESERVE, MemoryPlan, plan_memory
from dsrl_fast.planning.simulate import LossWorkspace
from dsrl_fast.planning.vllm import VllmReserves

# The planner reads no data, but configs that name a model require data.train_path: this stands in for it.
DATA_PLACEHOLDER = "plan-reads-no-data.jsonl"
DATA_KEY = "data.train_path"


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: a config (`preset` name, else `config` path, else the embedded default) with `overrides`
    (dotted key=value, applied in order) on `gpus` GPUs of `gpu_memory` bytes (`gpu_memory_source` says where that
    figure comes from); the loss model, the trainer's runtime reserve and vLLM's reserves as plan_memory takes them.
    """

    preset: str | None = None
    config: str | None = None
    overrides: tuple[str, ...] = ()
    gpus: int = 1
    gpu_memory: int = 80 << 30
    gpu_memory_source: str = "given"
    workspace: LossWorkspace = LossWorkspace()
    reserve: int = DEFAULT_RESERVE
    vllm_reserves: VllmReserves = VllmReserves()

    def with_overrides(self, *extra: str) -> PlanRequest:
        """This request with `extra` overrides applied after its own."""
        return dataclasses.replace(self, overrides=(*self.overrides, *extra))

    def load_config(self):  # -> TrainConfig (imported lazily: the train package is heavy)
        """The TrainConfig, with a stand-in data.train_path when none is given (the plan reads no data)."""
        from dsrl_fast.train.config import load_config, preset_path

        if self.gpus < 1:
            raise ValueError(f"--gpus must be >= 1, got {self.gpus}")
        path = preset_path(self.preset) if self.preset else self.config
        given = any(item.partition("=")[0].strip() == DATA_KEY for item in self.overrides)
        return load_config(path, list(self.overrides) if given else [f"{DATA_KEY}={DATA_PLACEHOLDER}",
                                                                      *self.overrides])

    def plan(self) -> MemoryPlan:
        """plan_memory of this request (ValueError/TypeError on a bad config or option)."""
        return plan_memory(self.load_config(), gpus=self.gpus, gpu_memory=self.gpu_memory, workspace=self.workspace,
                           reserve=self.reserve, vllm_reserves=self.vllm_reserves,
                           gpu_memory_source=self.gpu_memory_source)

    def train_command(self) -> str:
        """The `dsrl-fast train` command line of this request (torchrun over `gpus` processes when > 1); a missing
        data.train_path is written as TRAIN.jsonl for the user to replace."""
        from dsrl_fast.train.config import load_config, preset_path

        source = ["--preset", self.preset] if self.preset else (["--config", self.config] if self.config else [])
        try:
            load_config(preset_path(self.preset) if self.preset else self.config, self.overrides)
            data = []
        except ValueError:  # the config names a model but no data: the user supplies it
            data = [f"{DATA_KEY}=TRAIN.jsonl"]
        launcher = ["dsrl-fast"] if self.gpus == 1 else ["torchrun", "--nproc_per_node", str(self.gpus), "-m",
                                                         "dsrl_fast.cli"]
        return shlex.join([*launcher, "train", *source, *data, *self.overrides])
