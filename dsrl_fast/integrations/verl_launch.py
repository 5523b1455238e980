"""`python -m dsrl_fast.integrations.verl_launch <verl overrides>`: verl's own PPO entry point with dsrl_fast loaded
in every verl process.

verl 0.9.1 runs in three kinds of process: the driver (`verl.trainer.main_ppo`, Hydra), a Ray `TaskRunnerV1` actor
that looks the trainer up by `trainer.v1.trainer_mode`, and Ray worker actors that look the policy loss up and build
the model. Each imports verl afresh, and verl imports the modules named in VERL_USE_EXTERNAL_MODULES when it is
imported. `actor_rollout_ref.model.external_lib` is imported only where verl builds its model config, after the task
runner has looked up its trainer. So this launcher
- adds `dsrl_fast.integrations.verl_plugin` to VERL_USE_EXTERNAL_MODULES in the driver (a Ray cluster that the
  driver starts inherits it), and
- passes the same value to Ray's runtime_env (`++ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES`,
  which verl merges into its `ray.init`), so the task runner and the workers of an existing cluster get it too,
then runs verl's `main_ppo` with the other arguments unchanged. Modules already in the variable (or given by that
override) are kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from dsrl_fast.integrations.common import pip_extra, require

PLUGIN = "dsrl_fast.integrations.verl_plugin"
ENV = "VERL_USE_EXTERNAL_MODULES"
RUNTIME_ENV_KEY = f"ray_kwargs.ray_init.runtime_env.env_vars.{ENV}"

__all__ = ["ENV", "PLUGIN", "RUNTIME_ENV_KEY", "launch_arguments", "main"]


def _modules(value: str) -> list[str]:
    return [name.strip() for name in value.strip("'\"").split(",") if name.strip()]


def launch_arguments(overrides: Sequence[str], env_value: str | None) -> tuple[str, list[str]]:
    """The VERL_USE_EXTERNAL_MODULES value and the Hydra overrides that carry it into Ray's runtime_env.

    overrides: the user's verl overrides; env_value: the variable as the driver has it (None when unset). The value
    lists the modules of env_value, then those of a user override of RUNTIME_ENV_KEY (which is replaced), then
    PLUGIN, each once. Returns (value, overrides with `++RUNTIME_ENV_KEY='value'` appended).
    """
    names = _modules(env_value or "")
    kept = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+~") == RUNTIME_ENV_KEY:
            names += _modules(value)
        else:
            kept.append(item)
    value = ",".join(dict.fromkeys([*names, PLUGIN]))
    return value, [*kept, f"++{RUNTIME_ENV_KEY}='{value}'"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run verl's `main_ppo` on `argv` (default: this process's arguments) with the plugin in every process; without
    verl, one line on stderr and exit status 2."""
    value, overrides = launch_arguments(sys.argv[1:] if argv is None else argv, os.environ.get(ENV))
    os.environ[ENV] = value  # before verl is imported: verl imports these modules on import
    try:
        main_ppo = require("verl.trainer.main_ppo", pip_extra("verl"))
    except ImportError as err:
        print(f"verl_launch: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *overrides]  # Hydra reads its overrides from sys.argv
    main_ppo.main()


if __name__ == "__main__":
    main()
