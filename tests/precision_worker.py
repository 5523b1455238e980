"""DeepSpeed's gradient accumulation over many bf16 micro-batches, against the exact sum (a subprocess of
tests/train/test_precision.py: the runs share a one-rank process group, which must not outlive them).

    python tests/precision_worker.py --runs 1,2,3,2-default --micro-batches 64 --out result.json

For each run (a ZeRO stage; `-default`: the trainer's config without its `data_types` section, i.e. DeepSpeed's own
default, accumulation in the model's dtype) a tiny bf16 Qwen3 takes `--micro-batches` packed micro-batches through
DeepSpeedUpdater with the trainer's config from `deepspeed_config`. A plain copy of the model gives each
micro-batch's bf16 gradient; their float64 sum is the reference. The accumulated gradient is read with DeepSpeed's
`safe_get_full_grad` at the boundary, before the step. The JSON maps each run to, over all parameters, the error
norm ‖accumulated − reference‖ and the norm of one bf16 rounding of the reference ‖bf16(reference) − reference‖.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrl_fast.loss.config import PolicyLossConfig
from dsrl_fast.model.packed import prepare_packed_model
from dsrl_fast.data.packing import PackedBatch, pack
from dsrl_fast.train.updaters import DeepSpeedUpdater, PolicyModule, deepspeed_config

VOCAB = 37


def tiny_16bit_model(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A 1-layer Qwen3 (hidden 64, tied embeddings) in `dtype`, prepared for packed batches."""
    import transformers

    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      tie_word_embeddings=True, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = transformers.Qwen3ForCausalLM(config).to(dtype)
    return prepare_packed_model(model, attention_backend="torch")


def micro_batches(count: int, seed: int) -> list[tuple[PackedBatch, torch.Tensor]]:
    """`count` packed micro-batches of 3 samples (odd random lengths) with fresh random advantages (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        prompts = [torch.randint(0, VOCAB, (int(torch.randint(2, 9, (), generator=gen)),), generator=gen)
                   for _ in range(3)]
        responses = [torch.randint(0, VOCAB, (int(torch.randint(1, 13, (), generator=gen)),), generator=gen)
                     for _ in range(3)]
        batch = pack(prompts, responses, "cond")
        out.append((batch, torch.randn(batch.num_masked, generator=gen)))
    return out


def run(stage: int, count: int, deepspeed_default: bool) -> dict[str, float | str]:
    from deepspeed.utils import safe_get_full_grad

    model = tiny_16bit_model()
    plain = PolicyModule(copy.deepcopy(model), impl="torch")
    config = deepspeed_config(zero_stage=stage, offload_optimizer=False, offload_params=False, dtype=torch.bfloat16,
                              lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=0.0)
    if deepspeed_default:
        del config["data_types"]
    updater = DeepSpeedUpdater(PolicyModule(model, impl="torch"), config)
    loss_config = PolicyLossConfig()
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    reference = [torch.zeros(p.shape, dtype=torch.float64) for p in plain_params]
    batches = micro_batches(count, seed=1)
    for i, (batch, advantages) in enumerate(batches):
        grads = torch.autograd.grad(plain(batch, advantages, loss_config).loss, plain_params, allow_unused=True)
        for total, grad in zip(reference, grads, strict=True):
            if grad is not None:
                total += grad.double()
        updater.forward_backward(batch, advantages, loss_config, last=i == count - 1)
    error = bound = 0.0
    params = [p for p in updater.module.parameters() if p.requires_grad]
    for param, ref in zip(params, reference, strict=True):
        accumulated = safe_get_full_grad(param)
        assert accumulated is not None, "read at the accumulation boundary, before the step"
        error += float((accumulated.double().reshape(ref.shape) - ref).square().sum())
        bound += float((ref.to(torch.bfloat16).double() - ref).square().sum())
    return {"stage": stage, "accumulation": str(updater.engine.get_data_types()[1]), "error": error**0.5,
            "one_bf16_rounding": bound**0.5, "optimizer": type(updater.engine.optimizer).__name__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma-separated ZeRO stages, each optionally with -default")
    parser.add_argument("--micro-batches", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    results = {}
    for name in args.runs.split(","):
        stage, _, default = name.partition("-")
        results[name] = run(int(stage), args.micro_batches, default == "default")
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
