"""The `dsrl-fast plan` subcommand: will a run fit? (argument parsing and the printed table)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dsrl_fast.errors import UserError

__all__ = ["add_plan_parser"]

LOSS_CHOICES = {"no-logits": "no_logits", "grad-in-forward": "grad_in_forward", "torch": "torch"}
# The planner reads no data, but configs that name a model require data.train_path: this stands in for it.
_DATA_PLACEHOLDER = "data.train_path=plan-reads-no-data.jsonl"

_EPILOG = """The estimate is per GPU and in GiB: weights, fp32 masters, AdamW states and gradients by ZeRO stage and
offload, the activations of one packed micro-batch (the real model run on the meta device, every token scored),
the fused loss's workspace, the optimizer step's transients, vLLM's share (rollout.gpu_memory_utilization; none
during the update with rollout.sleep_between_generations) and a runtime reserve. The exit status is 0 whether or not the run fits; bad input exits with 2.
example: dsrl-fast plan --preset qwen3_4b_math --gpus 8 --gpu-memory 80GiB optim.max_tokens_per_micro_batch=32768"""


def add_plan_parser(sub: argparse._SubParsersAction,
                    add_debug: Callable[[argparse.ArgumentParser, object], None]) -> None:
    """Register `plan` on the `dsrl-fast` subparsers (`add_debug` adds the shared --debug flag)."""
    p = sub.add_parser("plan", help="estimate the GPU memory of a training run before launching it",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
                       description="Estimate the per-GPU memory of a training config, whether it fits, and the "
                                   "largest optim.max_tokens_per_micro_batch that fits.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", default=None, help="YAML config file")
    source.add_argument("--preset", default=None, help="a shipped preset (see `dsrl-fast presets`)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 80GB, 24GiB (default 80GiB)")
    p.add_argument("--loss", choices=tuple(LOSS_CHOICES), default="no-logits",
                   help="fused-loss path: no-logits (Triton, default), grad-in-forward or torch")
    p.add_argument("--loss-workspace", default="1GiB",
                   help="grad-in-forward's fp32 logits chunk budget (default 1GiB)")
    p.add_argument("--reserve", default="2GiB",
                   help="set aside for the CUDA context, workspaces and fragmentation (default 2GiB)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. deepspeed.zero_stage=3 rollout.gpu_memory_utilization=0.3")
    add_debug(p, argparse.SUPPRESS)
    p.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    from dsrl_fast.planning.memory import plan_memory
    from dsrl_fast.planning.report import format_plan, parse_memory
    from dsrl_fast.planning.simulate import LossWorkspace
    from dsrl_fast.train.config import load_config, preset_path

    try:
        if args.gpus < 1:
            raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
        gpu_memory = parse_memory(args.gpu_memory)
        reserve = parse_memory(args.reserve)
        workspace = LossWorkspace(LOSS_CHOICES[args.loss], workspace_bytes=parse_memory(args.loss_workspace))
        path = preset_path(args.preset) if args.preset else args.config
        given = any(item.partition("=")[0].strip() == "data.train_path" for item in args.overrides)
        cfg = load_config(path, args.overrides if given else [_DATA_PLACEHOLDER, *args.overrides])
        plan = plan_memory(cfg, gpus=args.gpus, gpu_memory=gpu_memory, workspace=workspace,
                           reserve=reserve)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    print(format_plan(plan))
    return 0
