"""The embedded toy task: tokenizer, problems, tiny Qwen3, supervised warm-up, save/load."""

from __future__ import annotations

import pytest
import torch

from dsrl_fast.data.problems import Problem
from dsrl_fast.reward import exact_match_reward
from dsrl_fast.data.toy import (
    EOS,
    IM_START,
    TOY_VOCAB,
    build_toy_tokenizer,
    encode_prompts,
    make_addition_problems,
    sft_target,
)
from dsrl_fast.model.tiny import build_tiny_qwen3, save_tiny_model
from dsrl_fast.train.sections import SFTConfig
from dsrl_fast.train.warmup import supervised_warmup


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def _model(tokenizer, seed: int = 0):
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return build_tiny_qwen3(len(tokenizer), seed=seed, **ids)


def test_tokenizer_vocabulary_and_special_tokens(tokenizer):
    assert len(tokenizer) == len(TOY_VOCAB) == 22
    assert tokenizer.convert_ids_to_tokens(list(range(len(TOY_VOCAB)))) == list(TOY_VOCAB)
    assert tokenizer.eos_token == EOS and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer(IM_START, add_special_tokens=False)["input_ids"] == [TOY_VOCAB.index(IM_START)]
    assert tokenizer("Compute 5+7.")["input_ids"][0] == tokenizer.bos_token_id


@pytest.mark.parametrize("text", ["Compute 57+32.", "57+32=89 \\boxed{89}", "0", "Compute 100+9.\\boxed{}", " 1 2 "])
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_digits_are_single_tokens_and_unknowns_map_to_unk(tokenizer):
    assert len(tokenizer("12345", add_special_tokens=False)["input_ids"]) == 5
    assert tokenizer("Compute x.", add_special_tokens=False)["input_ids"][2] == tokenizer.unk_token_id


def test_addition_problems_are_deterministic_distinct_and_correct():
    problems = make_addition_problems(500, seed=3)
    assert problems == make_addition_problems(500, seed=3)
    assert problems != make_addition_problems(500, seed=4)
    assert len({p.prompt_text for p in problems}) == 500
    for p in problems:
        a, b = p.meta["a"], p.meta["b"]
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert p.prompt_text == f"Compute {a}+{b}." and p.answer == str(a + b)
    full = make_addition_problems(4, seed=0, low=1, high=2)
    assert sorted((p.meta["a"], p.meta["b"]) for p in full) == [(1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 0}, ValueError, "n must be"),
        ({"n": 8101}, ValueError, "n must be"),
        ({"n": 3, "low": 9, "high": 5}, ValueError, "low and high"),
        ({"n": 2.0}, TypeError, "n must be an int"),
    ],
)
def test_addition_problems_validate(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_addition_problems(**kwargs)


def test_sft_target_is_rewarded_and_tokenizes_cleanly(tokenizer):
    problems = make_addition_problems(50, seed=1)
    targets = [sft_target(p) for p in problems]
    assert (
        targets[0]
        == f"{problems[0].meta['a']}+{problems[0].meta['b']}={problems[0].answer} \\boxed{{{problems[0].answer}}}"
    )
    assert exact_match_reward(targets, [p.answer for p in problems]) == [1.0] * 50
    wrong = [Problem(p.prompt_text, str(int(p.answer) + 1)) for p in problems]
    assert exact_match_reward(targets, [p.answer for p in wrong]) == [0.0] * 50
    with pytest.raises(ValueError, match="problem must be"):
        sft_target(Problem("Compute 1+1.", "2"))


def test_tiny_qwen3_shape_and_seeding(tokenizer):
    state = torch.get_rng_state()
    model = _model(tokenizer)
    assert torch.equal(torch.get_rng_state(), state)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 128, 4, 2)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.max_position_embeddings, cfg.vocab_size) == (32, 512, 64, 22)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    same, other = _model(tokenizer), _model(tokenizer, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="eos_token_id"):
        build_tiny_qwen3(22, eos_token_id=22)


def test_supervised_warmup_lowers_the_loss_and_restores_mode(tokenizer):
    model = _model(tokenizer).eval()
    problems = make_addition_problems(300, seed=0)
    result = supervised_warmup(model, tokenizer, problems, SFTConfig(steps=25, batch_size=32, lr=3e-3), seed=0)
    losses = result.losses
    assert result.steps == len(losses) == 25 and not model.training
    assert (result.checks, result.reached) == ([], None)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
    again = supervised_warmup(_model(tokenizer), tokenizer, problems, SFTConfig(steps=3, batch_size=32), seed=0)
    assert again.losses == pytest.approx(losses[:3], rel=1e-5)
    with pytest.raises(ValueError, match="sft.steps must be >= 1 for a warm-up, got 0"):
        supervised_warmup(model, tokenizer, problems, SFTConfig(steps=0))
    with pytest.raises(TypeError, match="sft must be an SFTConfig, got int"):
        supervised_warmup(model, tokenizer, problems, 25)
    with pytest.raises(ValueError, match="measure must be given with sft.target_accuracy=0.5"):
        supervised_warmup(model, tokenizer, problems, SFTConfig(steps=5, target_accuracy=0.5))
    # The last step's gradients were left on the parameters, and RL step 0's backward added to them.
    assert all(p.grad is None for p in model.parameters())


def test_supervised_warmup_ends_early_when_asked(tokenizer):
    """should_stop is asked before every step: the warm-up ends at the first True (the trainer's stop request)."""
    problems = make_addition_problems(300, seed=0)
    asked = []

    def should_stop() -> bool:
        asked.append(len(asked))
        return len(asked) > 4

    model = _model(tokenizer)
    sft = SFTConfig(steps=1000, batch_size=8)
    losses = supervised_warmup(model, tokenizer, problems, sft, seed=0, should_stop=should_stop).losses
    assert len(losses) == 4 and len(asked) == 5
    assert losses == pytest.approx(supervised_warmup(_model(tokenizer), tokenizer, problems,
                                                     SFTConfig(steps=4, batch_size=8), seed=0).losses, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


class ScriptedAccuracy:
    """Stands in for the trainer's check (which samples the model): returns the given accuracies in turn and
    records how many supervised steps the model had taken at each call, so the test controls when the target is
    reached; the trainer's real check runs in tests/e2e/test_trainer_e2e.py."""

    def __init__(self, optimizer_steps: list[int], accuracies: list[float]):
        self.optimizer_steps, self.accuracies, self.seen = optimizer_steps, list(accuracies), []

    def __call__(self) -> float:
        self.seen.append(len(self.optimizer_steps))
        return self.accuracies.pop(0)


@pytest.mark.parametrize("accuracies, steps, reached", [
    ([0.1, 0.3, 0.6, 0.9], 15, True),     # the third check (after 15 steps) reaches 0.5: the warm-up ends there
    ([0.1, 0.2, 0.3, 0.4, 0.45], 23, False),  # never reached: the cap (23) ends it, after a last check
])
def test_supervised_warmup_trains_until_a_check_reaches_the_target(tokenizer, capsys, monkeypatch, accuracies,
                                                                   steps, reached):
    problems = make_addition_problems(200, seed=0)
    model = _model(tokenizer)
    taken: list[int] = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (taken.append(1), step(self, *a, **k))[1])
    measure = ScriptedAccuracy(taken, accuracies)
    sft = SFTConfig(steps=23, batch_size=8, target_accuracy=0.5, eval_every=5)
    result = supervised_warmup(model, tokenizer, problems, sft, seed=0, measure=measure)
    assert (result.steps, len(taken), result.reached) == (steps, steps, reached)
    expected_checks = [5, 10, 15] if reached else [5, 10, 15, 20, 23]
    assert measure.seen == expected_checks
    assert result.checks == list(zip(expected_checks, accuracies))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"warm-up {s}/23" for s in expected_checks]
    assert lines[0] == f"warm-up 5/23: loss {result.losses[4]:.3f}, accuracy 0.100 (target 0.500)"
    # Same seed, same data: the steps taken are those of a fixed-length warm-up of that many steps.
    fixed = supervised_warmup(_model(tokenizer), tokenizer, problems, SFTConfig(steps=steps, batch_size=8), seed=0)
    assert result.losses == pytest.approx(fixed.losses, rel=1e-5)


def test_supervised_warmup_without_target_prints_its_loss_every_eval_every_steps(tokenizer, capsys):
    problems = make_addition_problems(100, seed=0)
    result = supervised_warmup(_model(tokenizer), tokenizer, problems, SFTConfig(steps=7, batch_size=4, eval_every=3))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"warm-up {s}/7: loss {result.losses[s - 1]:.3f}" for s in (3, 6, 7)]


def test_saved_model_reloads_with_transformers(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _model(tokenizer).eval()
    save_tiny_model(model, tokenizer, tmp_path / "toy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "toy").eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "toy")
    text = "Compute 57+32.57+32=89 \\boxed{89}"
    ids = loaded_tok(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"] and loaded_tok.decode(ids, skip_special_tokens=True) == text
    assert (loaded_tok.eos_token_id, loaded_tok.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits, rtol=0, atol=0
        )


def test_encode_prompts_prepends_bos(tokenizer):
    problems = make_addition_problems(3, seed=5)
    for ids, p in zip(encode_prompts(tokenizer, problems), problems):
        assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == p.prompt_text
