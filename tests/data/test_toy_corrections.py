"""The self-correcting sums toy (dsrl_fast.data.toy_corrections): deterministic problems, traces the project's reward
accepts, reflection and transition steps the paper's taxonomy sees, and its selection by data.toy_task."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsrl_fast.eval.thoughts import classify_response, count_thoughts
from dsrl_fast.reward import exact_match_reward, get_reward_fn
from dsrl_fast.data.toy import IM_START
from dsrl_fast.model.tiny import build_tiny_qwen3
from dsrl_fast.train.sections import SFTConfig
from dsrl_fast.train.warmup import supervised_warmup
from dsrl_fast.data.toy_corrections import (
    CORRECTIONS_VOCAB,
    build_corrections_tokenizer,
    correction_target,
    make_correction_problems,
)
from dsrl_fast.train.config import load_config
from dsrl_fast.train.setup import build_tokenizer, load_train_eval_problems

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_corrections_tokenizer()


@pytest.fixture(scope="module")
def problems():
    return make_correction_problems(2000, seed=5)


def test_problems_are_deterministic_per_seed_and_distinct(problems):
    again = make_correction_problems(2000, seed=5)
    assert [(p.prompt_text, p.answer, p.meta) for p in again] == [(p.prompt_text, p.answer, p.meta) for p in problems]
    other = make_correction_problems(2000, seed=6)
    assert [p.meta["target"] for p in other] != [p.meta["target"] for p in problems]
    assert len({p.prompt_text for p in problems}) == len(problems)
    for p in problems[:50]:
        a, b, c = p.meta["a"], p.meta["b"], p.meta["c"]
        assert p.prompt_text == f"Compute {a}+{b}+{c}." and p.answer == str(a + b + c) and 10 <= min(a, b, c)
        assert max(a, b, c) <= 49


def test_traces_verify_with_the_projects_rewards(problems):
    targets = [correction_target(p) for p in problems]
    answers = [p.answer for p in problems]
    assert get_reward_fn("hendrycks_math")(targets, answers) == [1.0] * len(problems)
    assert exact_match_reward(targets, answers) == [1.0] * len(problems)
    # A trace of another problem is scored wrong: the check is not vacuous.
    assert exact_match_reward(targets[1:3], answers[:2]) != [1.0, 1.0] or answers[1:3] == answers[:2]


def test_the_thought_classifier_sees_reflections_and_transitions(problems):
    targets = [correction_target(p) for p in problems]
    labels = [tuple(classify_response(t)) for t in targets]
    plain = ("execution",) * 3
    wait = ("execution", "reflection", "execution", "execution")
    switch = ("execution", "transition", "execution", "execution")
    assert set(labels) == {plain, wait, switch}
    # correction_rate 0.3, transition_share 0.3: 21% reflection traces, 9% transition traces (binomial, n=2000).
    assert labels.count(wait) / len(labels) == pytest.approx(0.21, abs=0.04)
    assert labels.count(switch) / len(labels) == pytest.approx(0.09, abs=0.03)
    counts = count_thoughts(targets)
    assert counts.reflection == labels.count(wait) and counts.transition == labels.count(switch)
    for p, label in zip(problems, labels):
        steps = p.meta["target"].split("\n\n")
        if label != plain:  # a corrected trace's first sum is wrong, its fix right
            a, b = p.meta["a"], p.meta["b"]
            assert steps[0] != f"{a}+{b}={a + b}" and steps[0].startswith(f"{a}+{b}=")


def test_no_corrections_when_the_rate_is_zero():
    targets = [correction_target(p) for p in make_correction_problems(300, seed=1, correction_rate=0.0)]
    assert count_thoughts(targets).reflection == count_thoughts(targets).transition == 0


def test_tokenizer_round_trips_and_the_longest_trace_fits_the_model(tokenizer, problems):
    assert len(tokenizer) == len(CORRECTIONS_VOCAB) == 26
    assert tokenizer(IM_START, add_special_tokens=False)["input_ids"] == [CORRECTIONS_VOCAB.index(IM_START)]
    lengths = []
    for p in problems:
        ids = tokenizer(p.meta["target"], add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == p.meta["target"]
        lengths.append(len(tokenizer(p.prompt_text)["input_ids"]) + len(ids) + 1)  # + EOS
    assert max(lengths) <= 50 <= 64  # 64: the tiny model's positions


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="correction_rate must be a number in \\[0, 1\\], got 1.5"):
        make_correction_problems(3, correction_rate=1.5)
    with pytest.raises(ValueError, match="n must be in \\[1, 8\\]"):
        make_correction_problems(9, low=1, high=2)
    with pytest.raises(TypeError, match="seed must be an int, got str"):
        make_correction_problems(3, seed="0")
    with pytest.raises(ValueError, match="meta target"):
        correction_target(make_correction_problems(1)[0].__class__("Compute 1+2.", "3", {"a": 1, "b": 2}))


def test_supervised_warmup_learns_the_traces(tokenizer, problems):
    model = build_tiny_qwen3(len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    losses = supervised_warmup(model, tokenizer, problems[:256], SFTConfig(steps=12, batch_size=32),
                               target=correction_target).losses
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]
    with pytest.raises(TypeError, match="target must be callable"):
        supervised_warmup(model, tokenizer, problems[:4], SFTConfig(steps=1), target="trace")


def _marginal_nll(model, tokenizer, problems) -> float:
    """Mean per-token NLL of ``<|im_start|> + trace + EOS`` (the sequence PreRL scores), no prompt."""
    import torch
    import torch.nn.functional as F

    prefix = tokenizer.convert_tokens_to_ids(IM_START)
    total = count = 0.0
    with torch.no_grad():
        for p in problems:
            ids = [prefix] + tokenizer(p.meta["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
            total += float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    return total / count


def test_marginal_share_trains_the_unprompted_traces(tokenizer, problems):
    nll = {}
    for share in (0.0, 0.5):
        model = build_tiny_qwen3(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        supervised_warmup(model, tokenizer, problems[:256], SFTConfig(steps=30, batch_size=32),
                          target=correction_target, marginal_share=share)
        nll[share] = _marginal_nll(model, tokenizer, problems[1000:1030])
    # Without unprompted rows the marginal space is never trained (the first token after <|im_start|> is a guess).
    assert nll[0.5] < 0.8 * nll[0.0], nll
    with pytest.raises(ValueError, match="marginal_share must be a number in \\[0, 1\\], got 2"):
        supervised_warmup(model, tokenizer, problems[:4], SFTConfig(steps=1), target=correction_target,
                          marginal_share=2)


def test_data_toy_task_selects_the_task(tmp_path: Path):
    cfg = load_config(None, ["data.toy_task=corrections", "data.toy_low=10", "data.toy_high=19",
                             "data.toy_train_size=900", "data.eval_size=50", f"output_dir={tmp_path}"])
    train, held_out = load_train_eval_problems(cfg)
    assert len(train) == 900 and len(held_out) == 50
    assert not {p.prompt_text for p in train} & {p.prompt_text for p in held_out}
    assert all(p.prompt_text.count("+") == 2 for p in train)
    assert build_tokenizer(cfg).convert_tokens_to_ids("Wait") == CORRECTIONS_VOCAB.index("Wait")
    default = load_config(None, [f"output_dir={tmp_path}"])
    assert default.data.toy_task == "addition" and load_train_eval_problems(default)[0][0].prompt_text.count("+") == 1
    with pytest.raises(ValueError, match="data.toy_task must be one of \\('addition', 'corrections'\\), got 'sums'"):
        load_config(None, ["data.toy_task=sums"])
    with pytest.raises(ValueError, match="data.toy_train_size must be <= 950 \\(the 1000 distinct operand triples"):
        load_config(None, ["data.toy_task=corrections", "data.toy_low=10", "data.toy_high=19",
                           "data.toy_train_size=951", "data.eval_size=50"])


def test_trainer_runs_the_corrections_task_end_to_end(tmp_path: Path):
    from dsrl_fast.train.metrics_log import read_metrics
    from dsrl_fast.train.trainer import train

    overrides = ["data.toy_task=corrections", "data.toy_train_size=64", "data.eval_size=4", "sft.steps=3",
                 "sft.target_accuracy=null", "eval_n=1",
                 "sft.batch_size=16", "steps=2", "prompts_per_step=2", "rollout.n=4", "rollout.max_response_len=48",
                 "algo.switch_step=1", "checkpoint_every=0", "progress=false", "reward=hendrycks_math",
                 f"output_dir={tmp_path}"]
    summary = train(load_config(None, overrides))
    assert summary.steps == 2
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward_mean" in r]
    assert [r["space"] for r in rows] == ["marginal", "conditional"]
    assert all(0.0 <= r["reflection_share"] <= 1.0 for r in rows)
    saved = (tmp_path / "sft_warmup" / "tokenizer.json").read_text()
    assert '"Alternatively"' in saved
