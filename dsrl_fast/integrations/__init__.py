"""Drop-in use of dsrl_fast's loss and fused log-probs inside other trainers.

One module per peer, each importable only when that peer is installed (an ImportError names the pip command):
`dsrl_fast.integrations.trl` (TRL's GRPOTrainer), `dsrl_fast.integrations.verl` (verl's policy-loss registry and
fused-kernel hook), `dsrl_fast.integrations.openrlhf` (OpenRLHF's PolicyLoss). The peer-independent tensor helpers
live in `dsrl_fast.integrations.common`.
"""
