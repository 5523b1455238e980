"""OpenRLHF: dsrl_fast's loss as OpenRLHF's PolicyLoss (GRPO / NSR / PSR / dual clip) and the fused log-probs as
its Actor.forward, installed in OpenRLHF's Ray actors.

Launch (instead of ``python -m openrlhf.cli.train_ppo_ray ...``)::

    python -m dsrl_fast.integrations.openrlhf.launch --dsrl.samples negative <OpenRLHF's arguments>

Modules: `loss` (DSRLPolicyLoss, patch_policy_loss), `actor` (patch_actor_forward), `worker` (the options, the Ray
runtime-env hook and worker hook), `launch` (the command above). Importing this package does not import
`openrlhf.models` (which needs flash_attn).
"""

from dsrl_fast.integrations.openrlhf.actor import patch_actor_forward
from dsrl_fast.integrations.openrlhf.loss import DSRLPolicyLoss, patch_policy_loss
from dsrl_fast.integrations.openrlhf.worker import WorkerOptions, runtime_env_hook, setup_worker

__all__ = ["DSRLPolicyLoss", "WorkerOptions", "patch_actor_forward", "patch_policy_loss", "runtime_env_hook",
           "setup_worker"]
