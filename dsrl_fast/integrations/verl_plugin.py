"""Import hook for verl's `external_lib` / VERL_USE_EXTERNAL_MODULES option: importing this module registers
dsrl_fast's policy losses and fused-kernel backend with verl (the one module here with an import-time effect,
because verl loads extensions by importing them in each worker)."""

from dsrl_fast.integrations.verl import register

register()
