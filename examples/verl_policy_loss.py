"""dsrl_fast's losses inside verl: register them, then select one by name as verl's actor does.

In a verl run, launch verl through dsrl_fast's launcher and pick the loss by name (see dsrl_fast/integrations/verl.py):
    python -m dsrl_fast.integrations.verl_launch actor_rollout_ref.actor.policy_loss.loss_mode=nsr ...
This script calls the registered losses on a random verl-shaped micro-batch and builds the marginal rows.
Run: python examples/verl_policy_loss.py
"""

from __future__ import annotations

import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig

import dsrl_fast.integrations.verl_plugin  # noqa: F401  (registers dsrl / nsr / psr / nsr_prerl)
from dsrl_fast.integrations.verl import marginal_batch


def main() -> None:
    torch.manual_seed(0)
    rows, length = 4, 6
    config = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_high=0.28, ppo_micro_batch_size_per_gpu=2,
                         ppo_mini_batch_size=4, rollout_n=1)
    log_prob = (-torch.rand(rows, length)).requires_grad_()
    batch = {"old_log_prob": log_prob.detach() + 0.1 * torch.randn(rows, length), "log_prob": log_prob,
                 "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(rows, length),
                 "response_mask": torch.ones(rows, length)}
    for name in ("vanilla", "dsrl", "nsr", "psr", "nsr_prerl"):
        loss, metrics = get_policy_loss_fn(name)(**batch, loss_agg_mode="token-mean", config=config)
        print(f"{name:>9}: loss={loss.item():+.5f} clipfrac={metrics['actor/pg_clipfrac']:.3f}")
    responses = torch.randint(0, 100, (rows, length))
    input_ids, _attention_mask, position_ids = marginal_batch(responses, batch["response_mask"], (151644,))
    print("marginal row 0:", input_ids[0].tolist(), "positions:", position_ids[0].tolist())


if __name__ == "__main__":
    main()
