"""Import hook for verl's VERL_USE_EXTERNAL_MODULES (set by `dsrl_fast.integrations.verl_launch`) or `external_lib`
option: importing this module registers dsrl_fast's policy losses, fused-kernel backend, the "dsrl" v1 trainer and
the marginal-phase worker hook with verl (the one module here with an import-time effect, because verl loads
extensions by importing them in each of its processes)."""

from dsrl_fast.integrations import verl, verl_marginal

verl.register()
verl_marginal.install()
