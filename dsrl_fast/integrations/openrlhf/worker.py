"""Where the OpenRLHF swap runs: the options it carries, the Ray job's runtime env and the Ray worker hook.

OpenRLHF builds its PolicyLoss and Actor inside Ray actor processes, so the swap has to happen there.
`runtime_env_hook` (Ray's RAY_RUNTIME_ENV_HOOK, which `launch` sets) adds to the runtime env that OpenRLHF's driver
passes to `ray.init`: `setup_worker` as the `worker_process_setup_hook` and the options as DSRL_FAST_* env vars.
`setup_worker` then runs in every worker process of the job (policy, reference, critic, reward and vLLM engine
actors alike) and imports nothing of OpenRLHF: it arranges for `patch_policy_loss` and `patch_actor_forward` to run
right after `openrlhf.models` is first imported in that process. Only the model actors import it (vLLM engine
actors never do; it needs flash_attn), and they do so when Ray loads their class, before any PolicyLoss is built.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import math
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from dsrl_fast.loss.config import SAMPLE_FILTERS
from dsrl_fast.integrations.common import DENOMINATORS

__all__ = ["WorkerOptions", "runtime_env_hook", "setup_worker"]

SETUP_HOOK = "dsrl_fast.integrations.openrlhf.worker.setup_worker"
RUNTIME_ENV_HOOK = "dsrl_fast.integrations.openrlhf.worker.runtime_env_hook"
PATCHED_MODULE = "openrlhf.models"
ENV_SAMPLES, ENV_DENOMINATOR = "DSRL_FAST_SAMPLES", "DSRL_FAST_DENOMINATOR"
ENV_LOSS_SCALE, ENV_FUSED = "DSRL_FAST_LOSS_SCALE", "DSRL_FAST_FUSED_LOGPROBS"


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """What the Ray workers apply.

    Attributes:
        samples: DSRLPolicyLoss's sample filter: "all" (GRPO / PPO), "negative" (NSR), "positive" (PSR).
        denominator: "peer" (OpenRLHF's normalizer) or "kept" (the kept tokens/sequences, the authors' NSR).
        loss_scale: the policy loss is multiplied by it.
        fused_logprobs: also replace OpenRLHF's Actor.forward by the fused log-probs.
    """

    samples: str = "all"
    denominator: str = "peer"
    loss_scale: float = 1.0
    fused_logprobs: bool = True

    def __post_init__(self) -> None:
        if self.samples not in SAMPLE_FILTERS:
            raise ValueError(f"samples must be one of {SAMPLE_FILTERS}, got {self.samples!r}")
        if self.denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {DENOMINATORS}, got {self.denominator!r}")
        if isinstance(self.loss_scale, bool) or not isinstance(self.loss_scale, (int, float)) or not math.isfinite(
                self.loss_scale):
            raise ValueError(f"loss_scale must be a finite number, got {self.loss_scale!r}")
        if not isinstance(self.fused_logprobs, bool):
            raise TypeError(f"fused_logprobs must be a bool, got {type(self.fused_logprobs).__name__}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> WorkerOptions:
        """The options in DSRL_FAST_SAMPLES, DSRL_FAST_DENOMINATOR, DSRL_FAST_LOSS_SCALE and
        DSRL_FAST_FUSED_LOGPROBS ("1" | "0"); defaults where unset. ValueError naming the variable when malformed."""
        scale = environ.get(ENV_LOSS_SCALE, "1.0")
        try:
            loss_scale = float(scale)
        except ValueError as err:
            raise ValueError(f"{ENV_LOSS_SCALE} must be a number, got {scale!r}") from err
        fused = environ.get(ENV_FUSED, "1")
        if fused not in ("0", "1"):
            raise ValueError(f"{ENV_FUSED} must be '0' or '1', got {fused!r}")
        return cls(samples=environ.get(ENV_SAMPLES, "all"), denominator=environ.get(ENV_DENOMINATOR, "peer"),
                   loss_scale=loss_scale, fused_logprobs=fused == "1")

    def env_vars(self) -> dict[str, str]:
        """The DSRL_FAST_* variables that `from_env` reads back as these options."""
        return {ENV_SAMPLES: self.samples, ENV_DENOMINATOR: self.denominator, ENV_LOSS_SCALE: repr(self.loss_scale),
                ENV_FUSED: "1" if self.fused_logprobs else "0"}


def runtime_env_hook(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """RAY_RUNTIME_ENV_HOOK: `runtime_env` (what the driver passes to ray.init; OpenRLHF's sets env vars) plus
    `setup_worker` as the worker_process_setup_hook and the options of this process's DSRL_FAST_* variables."""
    options = WorkerOptions.from_env()
    merged = dict(runtime_env or {})
    hook = merged.get("worker_process_setup_hook")
    if hook not in (None, SETUP_HOOK):
        raise ValueError(f"runtime_env's worker_process_setup_hook must be unset (Ray runs one hook), got {hook!r}")
    merged["worker_process_setup_hook"] = SETUP_HOOK
    merged["env_vars"] = {**merged.get("env_vars", {}), **options.env_vars()}
    return merged


class _RunAfterExec(importlib.abc.Loader):
    """A module's own loader, with `after` called once its module has executed."""

    def __init__(self, loader: importlib.abc.Loader, after: Callable[[], None]) -> None:
        self.loader, self.after = loader, after

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.after()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds module `name` through the other finders and wraps its loader so that `patch` runs right after the
    module has executed; leaves sys.meta_path then."""

    def __init__(self, name: str, patch: Callable[[], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RunAfterExec(spec.loader, self._after_exec)
                return spec
        return None

    def _after_exec(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.patch()


def _apply(options: WorkerOptions) -> None:
    """Patch this process's OpenRLHF (openrlhf.models is imported) and say so on stderr, which Ray forwards to the
    driver with the actor's name."""
    from dsrl_fast.integrations.openrlhf.actor import patch_actor_forward
    from dsrl_fast.integrations.openrlhf.loss import patch_policy_loss

    patch_policy_loss(samples=options.samples, denominator=options.denominator, loss_scale=options.loss_scale)
    if options.fused_logprobs:
        patch_actor_forward()
    forward = "fused log-probs" if options.fused_logprobs else "OpenRLHF's"
    print(f"dsrl_fast: OpenRLHF PolicyLoss -> DSRLPolicyLoss(samples={options.samples}, "
          f"denominator={options.denominator}, loss_scale={options.loss_scale}); Actor.forward: {forward} "
          f"(pid {os.getpid()})", file=sys.stderr, flush=True)


def setup_worker() -> None:
    """Ray worker_process_setup_hook: patch OpenRLHF with `WorkerOptions.from_env()` in this process when
    `openrlhf.models` is first imported (at once if it already is)."""
    options = WorkerOptions.from_env()
    if PATCHED_MODULE in sys.modules:
        _apply(options)
        return
    if not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(PATCHED_MODULE, lambda: _apply(options)))
