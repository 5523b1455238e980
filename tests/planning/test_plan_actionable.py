"""dsrl_fast.planning for a GPU user: sizes with units, the GPU's own memory, vLLM's KV-cache capacity, the fixes
printed as commands (re-planned through the CLI), optim.max_tokens_per_micro_batch=auto, depth extrapolation."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import pytest
import torch

from dsrl_fast.cli import main
from dsrl_fast.planning import LossWorkspace, PlanRequest, VllmReserves, micro_batch_peak, parse_memory
from dsrl_fast.planning.shapes import model_config
from dsrl_fast.planning import simulate
from dsrl_fast.planning.vllm import vllm_share
from dsrl_fast.train.config import load_config, preset_path

GIB = 1 << 30
# A small Qwen3 (29M parameters) whose state and activations are of the same order, so that offload, ZeRO-3, tensor
# parallelism and the micro-batch all matter at a few hundred MiB; short sequences keep every plan fast.
MINI = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, tie_word_embeddings=True, max_position_embeddings=4096)
MINI_RUN = ("model.dtype=bfloat16", "data.max_prompt_len=64", "rollout.max_response_len=192",
            "optim.max_tokens_per_micro_batch=4096", "prompts_per_step=8", "rollout.n=4")
SMALL_GUESSES = ("--reserve", "1MiB", "--cuda-graph-memory", "16MiB", "--comm-buffers", "8MiB")


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import Qwen3Config

    path = tmp_path_factory.mktemp("mini")
    Qwen3Config(**MINI).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(("text", "expected"), [
    ("80GB", 80 * 10**9), ("80GiB", 80 * GIB), ("80 gb", 80 * 10**9), ("80gib", 80 * GIB), ("81920MiB", 80 * GIB),
    ("500MB", 500 * 10**6), ("1.5TB", 15 * 10**11), ("2TiB", 2 << 40), ("79.6GiB", int(79.6 * GIB)),
])
def test_sizes_take_decimal_and_binary_units(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80", "24", " 1.5 "])
def test_a_bare_number_is_refused_naming_both_units(text: str) -> None:
    with pytest.raises(ValueError, match=r"needs a unit: GB \(10\^9 bytes\) or GiB \(2\^30 bytes\)"):
        parse_memory(text)


def test_cli_bare_gpu_memory_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--gpu-memory", "80"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsrl-fast plan: error: memory size needs a unit") and err.count("\n") == 1


def test_report_labels_gib_and_gb_and_says_where_the_gpu_memory_comes_from(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--gpu-memory", "80GB", "rollout.engine=hf"]) == 0
    out = capsys.readouterr().out
    assert "1 GPU x 74.51 GiB = 80.00 GB;" in out and "GPU memory : from --gpu-memory 80GB" in out
    assert not torch.cuda.is_available()
    assert main(["plan", "rollout.engine=hf"]) == 0
    out = capsys.readouterr().out
    assert "1 GPU x 80.00 GiB = 85.90 GB;" in out and "from default (no CUDA device here)" in out


def test_on_a_cuda_machine_the_default_is_the_cards_total(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Stand-in: this machine has no GPU, so torch.cuda answers as an H100 80GB would (its total_memory)."""
    total = 85_045_231_616
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(total_memory=total, name="NVIDIA H100 80GB HBM3"))
    assert main(["plan", "rollout.engine=hf"]) == 0
    out = capsys.readouterr().out
    assert f"1 GPU x {total / GIB:.2f} GiB = {total / 1e9:.2f} GB;" in out
    assert "from this machine's CUDA device 0 (NVIDIA H100 80GB HBM3), total memory" in out


@pytest.mark.parametrize("tp", [1, 2])
def test_kv_cache_capacity_matches_a_hand_computation_for_qwen3_4b(tp: int) -> None:
    """Qwen3-4B (36 layers, 8 KV heads of 128, bf16) on 8 x 80 GiB, gpu_memory_utilization 0.5, the preset's
    128 prompts x 8 samples and 1,024 + 8,192 tokens; the numbers below are worked out by hand."""
    cfg = load_config(preset_path("qwen3_4b_math"), ["data.train_path=x.jsonl", f"rollout.tensor_parallel_size={tp}"])
    share = vllm_share(cfg, model_config("Qwen/Qwen3-4B"), params=4_022_468_096, bytes_per_value=2, gpus=8,
                       gpu_memory=80 * GIB, reserves=VllmReserves(cuda_graphs=GIB, comm_buffers_tp=GIB // 2))
    per_token = 2 * 36 * (8 // tp) * 128 * 2                     # 147,456 bytes (tp 1), 73,728 (tp 2)
    budget = 40 * GIB                                               # 0.5 x 80 GiB
    weights = 8_044_936_192 // tp                                   # 4,022,468,096 x 2 bytes / tp
    activations = 16384 * (3 * 9728 // tp + 4 * 2560) * 2 + 3 * 1024 * 151936 * 4
    kv = budget - weights - activations - GIB - (GIB // 2 if tp > 1 else 0)
    blocks = kv // (16 * per_token)
    assert (share.kv_bytes_per_token, share.weights, share.kv_cache) == (per_token, weights, kv)
    assert share.kv_tokens == blocks * 16
    assert share.full_sequences == blocks // 576                   # 9,216 tokens = 576 blocks of 16
    assert share.rollouts == 128 // 8 * tp * 8                      # prompts per rank x ranks per engine x n
    expected = {1: (208_000, 22), 2: (469_776, 50)}[tp]
    assert (share.kv_tokens, share.full_sequences) == expected
    assert share.preemption_bound and share.starts


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line.startswith("  torchrun ")]


def test_printed_fixes_make_the_plan_fit_when_replanned(mini_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI as a user types it: a run that does not fit 500 MiB GPUs (vLLM's KV cache holds no full sequence, the
    micro-batch is too large); every printed command's overrides, given back to `plan`, fit."""
    hardware = ["--gpus", "2", "--gpu-memory", "500MiB", *SMALL_GUESSES]
    run = [f"model.name_or_path={mini_model}", *MINI_RUN]
    assert main(["plan", *hardware, *run]) == 0
    out = capsys.readouterr().out
    assert "fits: NO" in out and "vLLM WILL NOT START" in out
    commands = _commands(out)
    assert len(commands) >= 2
    allowed = [int(line.split("up to ")[1].split(" tokens")[0].replace(",", ""))
               for line in out.splitlines() if line.startswith("  # micro-batches up to")]
    assert allowed == sorted(allowed, reverse=True) and len(allowed) == len(commands)
    for command in commands:
        assert command[:6] == ["torchrun", "--nproc_per_node", "2", "-m", "dsrl_fast.cli", "train"]
        overrides = command[6:]
        assert overrides[:len(run) + 1] == ["data.train_path=TRAIN.jsonl", *run]
        assert main(["plan", *hardware, *overrides]) == 0
        replanned = capsys.readouterr().out
        assert "fits: yes" in replanned and "changes that fit" not in replanned


def test_nothing_fits_says_so(mini_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--gpus", "2", "--gpu-memory", "300MiB", *SMALL_GUESSES,
                 f"model.name_or_path={mini_model}", *MINI_RUN]) == 0
    out = capsys.readouterr().out
    assert "fits: NO" in out and "no change tried here fits" in out and not _commands(out)


def _printed_micro_batch(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    assert main(["train", "--print-config", *argv]) == 0
    captured = capsys.readouterr()
    line = next(line for line in captured.out.splitlines() if "max_tokens_per_micro_batch:" in line)
    return int(line.split(":")[1]), captured.err


def test_auto_micro_batch_without_cuda_keeps_the_configs_value(capsys: pytest.CaptureFixture[str]) -> None:
    tokens, err = _printed_micro_batch(capsys, ["optim.max_tokens_per_micro_batch=auto"])
    assert tokens == load_config(None).optim.max_tokens_per_micro_batch
    assert err == f"optim.max_tokens_per_micro_batch=auto: no CUDA device, so the config's value {tokens} is used\n"


def test_auto_micro_batch_on_cuda_is_the_plans_largest(mini_model: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Stand-in: no GPU here, so torch.cuda reports an 8 GiB device, then a 600 MiB one (where the default 2 GiB
    reserve alone does not fit), to a 2-rank launch (WORLD_SIZE=2, rank 0)."""
    total = 8 * GIB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(total_memory=total, name="stand-in"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = [f"model.name_or_path={mini_model}", "data.train_path=x.jsonl", *MINI_RUN]
    tokens, err = _printed_micro_batch(capsys, [*run, "optim.max_tokens_per_micro_batch=auto"])
    expected = PlanRequest(overrides=tuple(run), gpus=2, gpu_memory=total).plan().max_tokens
    assert expected is not None and tokens == expected > 4096
    assert err.startswith(f"optim.max_tokens_per_micro_batch=auto: {expected} tokens") and err.count("\n") == 1
    total = 600 << 20
    assert main(["train", "--print-config", *run, "optim.max_tokens_per_micro_batch=auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsrl-fast train: error: optim.max_tokens_per_micro_batch=auto: no micro-batch holding the "
                          "longest sequence (256 tokens) fits") and err.count("\n") == 1


def test_depth_extrapolation_equals_the_full_depth_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """micro_batch_peak runs a 12-layer model at 1, 2 and 3 layers and extrapolates: the same bytes as the
    12-layer run itself (probe depths too deep to pay off make it run the full depth), with and without
    checkpointing, on the first micro-batch and a later one."""
    from transformers import Qwen3Config

    config = Qwen3Config(**{**MINI, "num_hidden_layers": 12, "vocab_size": 1007})
    for checkpointing, first in ((False, False), (True, False), (True, True)):
        kwargs = dict(dtype=torch.bfloat16, tokens=777, scored=513, gradient_checkpointing=checkpointing,
                      workspace=LossWorkspace(), first_micro_batch=first)
        extrapolated = micro_batch_peak(config, **kwargs)
        with monkeypatch.context() as patch:
            patch.setattr(simulate, "PROBE_DEPTHS", (4, 5, 6))
            full = micro_batch_peak(config, **kwargs)
        assert extrapolated == full > 0
