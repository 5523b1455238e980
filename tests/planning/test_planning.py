"""dsrl_fast.planning: parameter counts, state formulas, the micro-batch estimate against a measured CPU peak, CLI."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from dsrl_fast.planning import LossWorkspace, format_plan, micro_batch_peak, parse_memory, plan_memory
from dsrl_fast.planning.memory import GIB, MICRO_BATCH, STEP, TOKEN_GRANULE, count_parameters
from dsrl_fast.planning.shapes import model_config
from dsrl_fast.train.config import load_config, preset_path

# Measured peak vs estimate. The estimate follows what PyTorch operators allocate; on CPU the BLAS kernels also pack
# transposed operands into temporaries of their own (seen: up to 8% of the peak in the torch loss's backward), which a
# GPU's cuBLAS does not need.
MEASURED_RTOL = 0.10


def _preset(name: str, *overrides: str):
    return load_config(preset_path(name), ["data.train_path=unused.jsonl", *overrides])


def _toy(*overrides: str):
    return load_config(None, ["rollout.engine=vllm", *overrides])


def test_shipped_shapes_count_the_published_parameters() -> None:
    assert count_parameters(model_config("Qwen/Qwen3-4B")) == 4_022_468_096
    assert count_parameters(model_config("Qwen/Qwen3-8B")) == 8_190_735_360
    assert model_config("Qwen/Qwen3-4B-Base").hidden_size == 2560


def test_unknown_model_is_refused_with_the_shipped_names() -> None:
    with pytest.raises(ValueError, match="Qwen/Qwen3-4B"):
        model_config("someone/unknown-7b")


@pytest.mark.parametrize(("text", "expected"), [("80GiB", 80 * GIB), ("80 GB", 80 * 10**9), ("1.5gib", 3 * GIB // 2),
                                                ("81920MiB", 80 * GIB)])
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "80XB", "-1GiB", "0GiB", "GiB", "24"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_memory(text)


def test_loss_workspace_validates() -> None:
    with pytest.raises(ValueError, match="kind"):
        LossWorkspace("logits")
    with pytest.raises(ValueError, match="slice_share"):
        LossWorkspace(slice_share=0.0)
    with pytest.raises(ValueError, match="workspace_bytes"):
        LossWorkspace("grad_in_forward", workspace_bytes=0)


def _items(plan) -> dict[str, int]:
    return {item.name.split(" (")[0]: item.nbytes for item in plan.items}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_is_divided_as_zero_stage_says(stage: int) -> None:
    cfg = _toy("model.dtype=bfloat16", "deepspeed.enabled=true", f"deepspeed.zero_stage={stage}")
    psi = count_parameters(model_config(None))
    plan = plan_memory(cfg, gpus=4, gpu_memory=80 * GIB)
    items = _items(plan)
    assert items["weights"] == psi * 2 // (4 if stage == 3 else 1)
    assert items["fp32 master weights"] == 4 * psi // (4 if stage >= 1 else 1)
    assert items["optimizer states"] == 8 * psi // (4 if stage >= 1 else 1)
    assert items["gradients"] == psi * 2 // (4 if stage >= 2 else 1)
    vllm = sum(nbytes for name, nbytes in items.items() if name.startswith("vLLM"))
    assert vllm == math.ceil(cfg.rollout.gpu_memory_utilization * 80 * GIB)  # its parts add up to its budget


def test_offload_and_fp32_remove_what_they_should() -> None:
    psi = count_parameters(model_config(None))
    offloaded = _items(plan_memory(_toy("model.dtype=bfloat16", "deepspeed.enabled=true", "deepspeed.zero_stage=2",
                                        "deepspeed.offload_optimizer=true"), gpus=2, gpu_memory=80 * GIB))
    assert offloaded["fp32 master weights"] == offloaded["optimizer states"] == offloaded["gradients"] == 0
    assert offloaded["optimizer step"] == 0
    fp32 = _items(plan_memory(_toy("model.dtype=float32"), gpus=1, gpu_memory=80 * GIB))
    assert fp32["fp32 master weights"] == 0 and fp32["weights"] == 4 * psi and fp32["optimizer step"] == 4 * psi


def test_peak_adds_up_and_max_tokens_is_the_largest_that_fits() -> None:
    cfg = _toy("model.dtype=bfloat16", "rollout.engine=hf", "optim.max_tokens_per_micro_batch=4096")
    budget = 64 << 20
    plan = plan_memory(cfg, gpus=1, gpu_memory=budget, reserve=0)
    fixed = sum(i.nbytes for i in plan.items if i.phase in ("always", "update"))
    micro = sum(i.nbytes for i in plan.items if i.phase == MICRO_BATCH)
    step = sum(i.nbytes for i in plan.items if i.phase == STEP)
    assert plan.update_peak == fixed + max(micro, step)
    assert plan.max_tokens is not None and plan.max_tokens % TOKEN_GRANULE == 0
    config = model_config(None)

    def micro_at(tokens: int) -> int:
        return micro_batch_peak(config, dtype=torch.bfloat16, tokens=tokens, scored=tokens,
                                gradient_checkpointing=False, workspace=LossWorkspace())

    assert fixed + micro_at(plan.max_tokens) <= budget < fixed + micro_at(plan.max_tokens + TOKEN_GRANULE)
    assert plan.fits == (plan.peak <= budget)
    assert "largest optim.max_tokens_per_micro_batch that fits" in format_plan(plan)


def test_checkpointing_and_vllm_sleep_lower_the_peak() -> None:
    cfg = _preset("qwen3_4b_math", "deepspeed.enabled=true", "deepspeed.offload_optimizer=true",
                  "rollout.sleep_between_generations=true")
    plan = plan_memory(cfg, gpus=1, gpu_memory=80 * GIB)
    awake = plan_memory(cfg, gpus=1, gpu_memory=80 * GIB, vllm_sleep=False)
    freed = sum(i.nbytes for i in plan.items if i.name.startswith("vLLM") and i.phase == "rollout")
    kept = {i.name for i in plan.items if i.name.startswith("vLLM") and i.phase == "always"}
    assert kept == {"vLLM CUDA-graph pool (guess)", "vLLM communication buffers (guess)"}  # level-1 sleep keeps them
    assert awake.update_peak - plan.update_peak == freed > 0
    activations = _items(plan)["activations"]
    assert plan.gradient_checkpointing and plan.activations_other > 5 * activations
    assert plan.update_peak < plan.rollout_peak  # vLLM asleep during the update
    assert plan.max_tokens is not None and plan.max_tokens >= 65536


def _allocator_peak(prof: profile) -> int:
    """Peak of the bytes live at once among those allocated inside the profiled window, in time order, from the
    profiler's allocator events.

    Frees of blocks allocated before the window (the profiler reports them when an earlier profiled window
    allocated them) are left out: when they happen is not the window's doing. Under TRITON_INTERPRET=1 each
    launch's argument storages stay referenced by the interpreter's self-referencing `_to_cpu`/`_from_cpu`
    closures until Python's cyclic GC runs, and when it runs depends on every allocation the process made
    before; counted, the last micro-batch's attention launch (q, k, v, out, lse: 0.46 MB) freed by a collection
    inside the optimizer step's window lowered the step's measured peak from 12 psi to 10.6 psi in a full-suite
    run."""
    events: list[tuple[int, int, int]] = []

    def walk(nodes) -> None:
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    allocated: dict[int, int] = {}
    live = peak = 0
    for _, size, ptr in sorted(events):
        if size > 0:
            allocated[ptr] = size
            live += size
        elif ptr in allocated:
            live -= allocated.pop(ptr)
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(("impl", "checkpointing"), [
    ("triton", True),
    pytest.param("triton", False, marks=pytest.mark.slow),
    pytest.param("torch", False, marks=pytest.mark.slow),
    pytest.param("torch", True, marks=pytest.mark.slow),
])
def test_estimate_matches_the_measured_peak_of_a_training_micro_batch(impl: str, checkpointing: bool,
                                                                      one_torch_thread: None) -> None:
    """A tiny Qwen3 (fp32, tied head, odd sizes) runs two packed micro-batches through the project's packed
    forward, fused loss and backward, then an AdamW step (multi-tensor, as on a GPU). The CPU allocator's peak,
    read from the profiler's allocation events, is compared with the estimate: gradients + micro_batch_peak for
    the micro-batches, AdamW's states + its square-root temporary for the step."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dsrl_fast.loss.config import PolicyLossConfig
    from dsrl_fast.model.packed import prepare_packed_model
    from dsrl_fast.data.packing import pack
    from dsrl_fast.train.updaters import PolicyModule, TorchUpdater

    config = Qwen3Config(vocab_size=1007, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=256, tie_word_embeddings=True,
                         max_position_embeddings=256)
    model = Qwen3ForCausalLM(config)
    prepare_packed_model(model, attention_backend="triton")
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    prompts = [torch.randint(0, 1007, (n,)) for n in (19, 31, 11)]
    responses = [torch.randint(0, 1007, (n,)) for n in (53, 41, 66)]
    batch = pack(prompts, responses, "cond")
    updater = TorchUpdater(PolicyModule(model, impl=impl), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                           grad_clip=1.0)
    for group in updater.optimizer.param_groups:
        group["foreach"] = True
    advantages = torch.randn(batch.num_masked)
    # A full collection zeroes the GC's generation counters: the collections inside the window, which free the
    # Triton interpreter's launch garbage (see _allocator_peak), then fall at the same allocations whatever ran before.
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            out = updater.forward_backward(batch, advantages, PolicyLossConfig(), last=False)
            del out
    measured = _allocator_peak(prof)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        updater.step(1e-3)
    measured_step = _allocator_peak(prof)

    psi = sum(p.numel() for p in model.parameters())
    workspace = LossWorkspace("no_logits" if impl == "triton" else "torch")
    estimate = 4 * psi + micro_batch_peak(config, dtype=torch.float32, tokens=batch.num_tokens,
                                          scored=batch.num_masked, gradient_checkpointing=checkpointing,
                                          workspace=workspace)
    assert abs(estimate - measured) <= MEASURED_RTOL * measured, (estimate, measured)
    assert abs(12 * psi - measured_step) <= 0.01 * measured_step, (12 * psi, measured_step)


def test_cli_prints_the_table_and_exits_0_whether_or_not_it_fits(capsys: pytest.CaptureFixture[str]) -> None:
    from dsrl_fast.cli import main

    assert main(["plan", "--preset", "qwen3_8b_math", "--gpus", "1", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "Qwen/Qwen3-8B (8,190,735,360 parameters, bfloat16)" in out and "fits: NO" in out
    assert main(["plan", "--gpus", "1", "--gpu-memory", "80GiB", "rollout.engine=hf"]) == 0
    assert "fits: yes" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--gpu-memory", "80XB"], ["--gpus", "0"], ["optim.nope=1"],
                                  ["--gpus", "2", "deepspeed.enabled=false"], ["--config", "missing.yaml"]])
def test_cli_bad_input_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from dsrl_fast.cli import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsrl-fast plan: error: ") and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpus", "3"], "prompts_per_step must be a multiple of gpus=3 (each rank samples an equal share), got 128"),
    (["--gpus", "4", "rollout.tensor_parallel_size=3"], "rollout.tensor_parallel_size must divide gpus=4, got 3"),
])
def test_a_launch_the_trainer_refuses_has_no_plan(argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from dsrl_fast.cli import main

    assert main(["plan", "--preset", "qwen3_4b_math", "--gpu-memory", "80GiB", *argv]) == 2
    assert capsys.readouterr().err == f"dsrl-fast plan: error: {message}\n"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_first_micro_batch_peaks_no_higher_than_the_next(checkpointing: bool) -> None:
    """plan_memory charges the gradients plus a later micro-batch: the first one, whose backward creates the
    gradients, must not peak higher over them."""
    config = model_config(None)
    kwargs = dict(dtype=torch.bfloat16, tokens=700, scored=513, gradient_checkpointing=checkpointing,
                  workspace=LossWorkspace())
    assert 0 < micro_batch_peak(config, first_micro_batch=True, **kwargs) <= micro_batch_peak(config, **kwargs)
