"""Run OpenRLHF's PPO driver with dsrl_fast's loss (and fused log-probs) in its Ray actors.

    python -m dsrl_fast.integrations.openrlhf.launch [--dsrl.* options] <python -m openrlhf.cli.train_ppo_ray args>

The launcher checks its own options, puts them in DSRL_FAST_* variables, sets Ray's RAY_RUNTIME_ENV_HOOK to
`worker.runtime_env_hook` and runs `openrlhf.cli.train_ppo_ray` as `__main__` with the remaining arguments. OpenRLHF
parses and checks them itself, then starts Ray (`ray.init` when Ray is not initialized, or connects to the cluster in
RAY_ADDRESS); the hook adds `worker.setup_worker` and the options to that call's runtime env, so every actor of the
job patches OpenRLHF when (and only if) it imports `openrlhf.models`. Each patched actor prints one
"dsrl_fast: OpenRLHF PolicyLoss -> DSRLPolicyLoss(...)" line, which Ray shows in the driver's output.

Every node needs dsrl_fast installed next to OpenRLHF. Under `uv run`, Ray replaces RAY_RUNTIME_ENV_HOOK with its own
uv hook unless RAY_ENABLE_UV_RUN_RUNTIME_ENV=0: run the launcher with the environment's python instead.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import NoReturn

from dsrl_fast.loss.config import SAMPLE_FILTERS
from dsrl_fast.integrations.common import DENOMINATORS
from dsrl_fast.integrations.openrlhf.worker import RUNTIME_ENV_HOOK, WorkerOptions

__all__ = ["main"]

OPENRLHF_DRIVER = "openrlhf.cli.train_ppo_ray"
RAY_HOOK_VARIABLE = "RAY_RUNTIME_ENV_HOOK"
PROG = "python -m dsrl_fast.integrations.openrlhf.launch"


class _OneLineErrors(argparse.ArgumentParser):
    """Argument errors as one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog=PROG, allow_abbrev=False, description=__doc__.splitlines()[0],
                            epilog=f"Every other argument goes to python -m {OPENRLHF_DRIVER} (its own --help lists "
                                   "them).")
    parser.add_argument("--dsrl.samples", dest="samples", choices=SAMPLE_FILTERS, default="all",
                        help="sample filter of the policy loss: all (PPO/GRPO), negative (NSR), positive (PSR)")
    parser.add_argument("--dsrl.denominator", dest="denominator", choices=DENOMINATORS, default="peer",
                        help="peer: OpenRLHF's normalizer; kept: the kept tokens/sequences (the authors' NSR)")
    parser.add_argument("--dsrl.loss_scale", dest="loss_scale", type=float, default=1.0,
                        help="the policy loss is multiplied by it (the authors' NSR-PreRL coefficient: 0.01)")
    parser.add_argument("--dsrl.openrlhf_logprobs", dest="openrlhf_logprobs", action="store_true",
                        help="keep OpenRLHF's Actor.forward (full fp32 logits) instead of the fused log-probs")
    return parser


def parse(argv: list[str]) -> tuple[WorkerOptions, list[str]]:
    """(the workers' options, OpenRLHF's arguments) of a launcher command line; exits 2 on a bad --dsrl.* value."""
    parser = _parser()
    known, rest = parser.parse_known_args(argv)
    try:
        options = WorkerOptions(samples=known.samples, denominator=known.denominator, loss_scale=known.loss_scale,
                                fused_logprobs=not known.openrlhf_logprobs)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    return options, rest


def main(argv: list[str] | None = None) -> None:
    """The launcher's entry point (see the module docstring)."""
    options, openrlhf_args = parse(sys.argv[1:] if argv is None else argv)
    previous = os.environ.get(RAY_HOOK_VARIABLE)
    if previous not in (None, RUNTIME_ENV_HOOK):
        _parser().error(f"{RAY_HOOK_VARIABLE} must be unset (the launcher sets it), got {previous!r}")
    os.environ.update(options.env_vars())
    os.environ[RAY_HOOK_VARIABLE] = RUNTIME_ENV_HOOK
    sys.argv = [OPENRLHF_DRIVER, *openrlhf_args]
    runpy.run_module(OPENRLHF_DRIVER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
