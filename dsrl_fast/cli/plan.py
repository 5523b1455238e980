"""The `dsrl-fast plan` subcommand: will a run fit? (argument parsing and the printed report)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dsrl_fast.errors import UserError

__all__ = ["add_plan_parser"]

LOSS_CHOICES = {"no-logits": "no_logits", "grad-in-forward": "grad_in_forward", "torch": "torch"}

_EPILOG = """Sizes need a unit: GB = 10^9 bytes, GiB = 2^30 bytes (an "80 GB" H100 has about 79.6 GiB). The estimate is
per GPU: weights, fp32 masters, AdamW states and gradients by ZeRO stage and offload, the activations of one packed
micro-batch (the real model run on the meta device, every token scored), the fused loss's workspace, the optimizer
step's transients, vLLM's share (rollout.gpu_memory_utilization: weights, profiling peak, CUDA-graph pool,
communication buffers, KV cache; level-1 sleep keeps the pool and the buffers during the update) and a runtime
reserve. It also prints vLLM's KV-cache capacity against the step's rollouts and, when the run does not fit, the
changes that do as commands. The exit status is 0 whether or not the run fits; bad input exits with 2.
example: dsrl-fast plan --preset qwen3_4b_math --gpus 8 --gpu-memory 80GiB optim.max_tokens_per_micro_batch=32768"""


def add_plan_parser(sub: argparse._SubParsersAction,
                    add_debug: Callable[[argparse.ArgumentParser, object], None]) -> None:
    """Register `plan` on the `dsrl-fast` subparsers (`add_debug` adds the shared --debug flag)."""
    p = sub.add_parser("plan", help="estimate the GPU memory of a training run before launching it",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
                       description="Estimate the per-GPU memory of a training config, whether it fits, the "
                                   "largest optim.max_tokens_per_micro_batch that fits, vLLM's KV-cache capacity "
                                   "and, when it does not fit, the changes that do.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", default=None, help="YAML config file")
    source.add_argument("--preset", default=None, help="a shipped preset (see `dsrl-fast presets`)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--gpu-memory", default=None,
                   help="memory of one GPU with a unit, e.g. 80GB (10^9 bytes), 79.6GiB (2^30 bytes); default: this "
                        "machine's CUDA device, else 80GiB")
    p.add_argument("--loss", choices=tuple(LOSS_CHOICES), default="no-logits",
                   help="fused-loss path: no-logits (Triton, default), grad-in-forward or torch")
    p.add_argument("--loss-workspace", default="1GiB",
                   help="grad-in-forward's fp32 logits chunk budget (default 1GiB)")
    p.add_argument("--reserve", default="2GiB",
                   help="trainer's CUDA context, workspaces and fragmentation: a guess (default 2GiB)")
    p.add_argument("--cuda-graph-memory", default="1GiB",
                   help="vLLM's CUDA-graph pool, kept through sleep: a guess (default 1GiB)")
    p.add_argument("--comm-buffers", default="512MiB",
                   help="vLLM's NCCL/all-reduce buffers with tensor_parallel_size > 1, kept through sleep: a guess "
                        "(default 512MiB)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. deepspeed.zero_stage=3 rollout.gpu_memory_utilization=0.3")
    add_debug(p, argparse.SUPPRESS)
    p.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    from dsrl_fast.planning.auto import default_gpu_memory
    from dsrl_fast.planning.fixes import find_fixes
    from dsrl_fast.planning.report import format_plan
    from dsrl_fast.planning.request import PlanRequest
    from dsrl_fast.planning.simulate import LossWorkspace
    from dsrl_fast.planning.units import parse_memory
    from dsrl_fast.planning.vllm import VllmReserves

    try:
        if args.gpu_memory is None:
            gpu_memory, source = default_gpu_memory()
        else:
            gpu_memory, source = parse_memory(args.gpu_memory), f"--gpu-memory {args.gpu_memory}"
        request = PlanRequest(
            preset=args.preset, config=args.config, overrides=tuple(args.overrides), gpus=args.gpus,
            gpu_memory=gpu_memory, gpu_memory_source=source,
            workspace=LossWorkspace(LOSS_CHOICES[args.loss], workspace_bytes=parse_memory(args.loss_workspace)),
            reserve=parse_memory(args.reserve),
            vllm_reserves=VllmReserves(cuda_graphs=parse_memory(args.cuda_graph_memory),
                                       comm_buffers_tp=parse_memory(args.comm_buffers)))
        plan = request.plan()
        fixes = find_fixes(request, plan)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    print(format_plan(plan, fixes))
    return 0
