"""tests/conftest.py's `shared_warmup`: a replayed warm-up gives the weights, result and lines of a computed one."""

from __future__ import annotations

import pytest
import torch

import dsrl_fast.train.warmup as warmup_mod
from dsrl_fast.data.toy import build_toy_tokenizer, make_addition_problems
from dsrl_fast.model.tiny import build_tiny_qwen3
from dsrl_fast.train.sections import SFTConfig

SFT = SFTConfig(steps=6, batch_size=8, lr=3e-3, eval_every=3)


def _model(tokenizer: object, seed: int = 0) -> torch.nn.Module:
    return build_tiny_qwen3(len(tokenizer), seed=seed, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def test_a_replayed_warmup_equals_a_computed_one(shared_warmup: None, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = build_toy_tokenizer()
    problems = make_addition_problems(40, seed=3)
    replaying = warmup_mod.supervised_warmup
    real = replaying.__wrapped__

    first = replaying(_model(tokenizer), tokenizer, problems, SFT, seed=0)
    first_lines = capsys.readouterr().out
    replayed_model = _model(tokenizer)
    replayed = replaying(replayed_model, tokenizer, problems, SFT, seed=0)
    assert capsys.readouterr().out == first_lines and "warm-up 6/6: loss" in first_lines
    computed_model = _model(tokenizer)
    computed = real(computed_model, tokenizer, problems, SFT, seed=0)
    capsys.readouterr()

    assert replayed.losses == computed.losses == first.losses
    for (name, got), want in zip(replayed_model.state_dict().items(), computed_model.state_dict().values()):
        assert torch.equal(got, want), name
    # Another seed is another warm-up: computed, not replayed.
    other_model = _model(tokenizer)
    other = replaying(other_model, tokenizer, problems, SFT, seed=1)
    assert other.losses != computed.losses
    assert not torch.equal(other_model.lm_head.weight, computed_model.lm_head.weight)
