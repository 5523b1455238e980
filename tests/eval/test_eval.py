"""`dsrl-fast eval` end to end on a tiny byte-level Qwen3 and the first lines of the shared benchmark files (HF
engine), its generation cache, data specs, options and tables (the command line: test_eval_cli.py)."""

from __future__ import annotations

import ast
import csv
import itertools
import json
from pathlib import Path

import pytest
import torch

from dsrl_fast.eval.thoughts import ThoughtCounts
from dsrl_fast.eval.benchmarks import BENCHMARKS, load_eval_set, parse_data_specs
from dsrl_fast.eval.config import EvalConfig, parse_ks, parse_overrides
from dsrl_fast.eval.cache import CacheMismatch
from dsrl_fast.eval.models import ModelSpec, open_engine, parse_model_specs
from dsrl_fast.eval.report import settings_line, thought_ratios
from dsrl_fast.eval.runner import load_eval_sets, run_eval
from dsrl_fast.eval.scoring import BenchmarkResult, RowSettings
from tests.paths import REPO_ROOT

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA_DIR / "benchmarks").is_dir(),
                                reason=f"the shared benchmark files are not at {DATA_DIR}")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_text_model(directory: Path, seed: int = 0, vocab_pad: int = 0) -> Path:
    """A tiny Qwen3 with a byte-level tokenizer (any text, <|im_start|>/<|im_end|>/<eos>/<pad> specials), saved as a
    Hugging Face model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|im_start|>", "<|im_end|>", "<eos>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                        model_max_length=4096, clean_up_tokenization_spaces=False)
    config = Qwen3Config(vocab_size=len(tokenizer) + vocab_pad, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=96,
                         tie_word_embeddings=True, max_position_embeddings=4096, dtype="float32",
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return build_text_model(root / "base", seed=0), build_text_model(root / "tuned", seed=1)


def parity_reward(responses: list[str], references: list[str]) -> list[float]:
    """A deterministic stand-in reward (a random tiny model never answers right): even-length responses score 1."""
    assert len(responses) == len(references)
    return [float(len(r) % 2 == 0) for r in responses]


class CountingOpen:
    """open_engine that records how many prompts each engine was asked for."""

    def __init__(self) -> None:
        self.opened = 0
        self.prompts = 0

    def __call__(self, *args, **kwargs):
        self.opened += 1
        engine = open_engine(*args, **kwargs)
        outer = self

        class Counted:
            def generate(self, prompts, sampling):
                outer.prompts += len(prompts)
                return engine.generate(prompts, sampling)

            def close(self):
                engine.close()

        return Counted()


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def _cfg(**kw) -> EvalConfig:
    base = {"n": 4, "ks": (1, 2, 4), "max_new_tokens": 6, "limit": 2, "engine": "hf", "data_dir": str(DATA_DIR),
            "progress": False, "batch_size": 1}
    return EvalConfig(**{**base, **kw})


@needs_data
def test_eval_end_to_end_tables_counts_and_cache(model_dirs, tmp_path):
    base, tuned = model_dirs
    cfg = _cfg()
    sets = load_eval_sets(parse_data_specs("math500,olympiadbench"), cfg)
    assert [len(s.problems) for s in sets] == [2, 2]
    models = [ModelSpec("base", str(base)), ModelSpec("tuned", str(tuned))]
    opener = CountingOpen()
    out = run_eval(models, sets, cfg, tmp_path / "out", reward_fn=parity_reward, open_fn=opener)
    assert opener.opened == 2 and opener.prompts == 2 * 2 * 2  # one engine per model; 2 problems x 2 benchmarks

    assert [(r.model, r.benchmark) for r in out.results] == [
        ("base", "math500"), ("base", "olympiadbench"), ("tuned", "math500"), ("tuned", "olympiadbench")]
    for r in out.results:
        gen_file = tmp_path / "out" / "generations" / r.model / f"{r.benchmark}.jsonl"
        lines = gen_file.read_text().splitlines()
        header, records = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
        assert header["settings"]["n"] == 4 and header["settings"]["template"] == "qwen3_non_thinking"
        assert [rec["index"] for rec in records] == [0, 1]
        assert all(len(rec["responses"]) == 4 and all(1 <= t <= 6 for t in rec["num_tokens"]) for rec in records)
        counts = [sum(parity_reward(rec["responses"], ["x"] * 4)) for rec in records]
        with open(tmp_path / "out" / "problems" / r.model / f"{r.benchmark}.csv") as f:
            assert [int(row["correct"]) for row in csv.DictReader(f)] == counts
        assert r.avg == pytest.approx(sum(counts) / 8)
        for k in (1, 2, 4):
            expected = sum(brute_pass_at_k(4, int(c), k) for c in counts) / 2
            assert r.pass_at_k[k] == pytest.approx(expected, abs=1e-12)
        assert r.thoughts.steps >= 8  # every response has at least one step

    saved = json.loads(Path(out.tables["json"]).read_text())
    assert saved["settings"]["n"] == 4 and len(saved["results"]) == 4
    assert saved["settings"]["scorer"] == "parity_reward"
    assert saved["results"][0]["pass@2"] == pytest.approx(out.results[0].pass_at_k[2])
    for row in saved["results"]:  # every row says what made it
        assert (row["scorer"], row["max_new_tokens"], row["n"], row["temperature"], row["top_p"]) == (
            "parity_reward", 6, 4, 1.0, 1.0)
    with open(out.tables["csv"]) as f:
        assert {(r["scorer"], r["max_new_tokens"], r["temperature"]) for r in csv.DictReader(f)} == {
            ("parity_reward", "6", "1.0")}
    markdown = Path(out.tables["markdown"]).read_text()
    assert "### math500 (2 problems, n = 4)" in markdown and "| tuned |" in markdown
    settings = "scorer parity_reward · length cap 6 tokens · n = 4 · temperature 1.0 · top_p 1.0"
    assert markdown.count(settings) == 2  # under each benchmark's heading
    assert Path(out.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = {(r.model, r.benchmark): r.pass_at_k for r in out.results}

    # complete caches: nothing is generated again (no engine is even opened) and the numbers repeat
    again = CountingOpen()
    out2 = run_eval(models, sets, cfg, tmp_path / "out", reward_fn=parity_reward, open_fn=again)
    assert again.opened == 0
    assert {(r.model, r.benchmark): r.pass_at_k for r in out2.results} == first

    # an interrupted run (last problem missing, a half-written line) resumes with only the missing problem
    gen_file = tmp_path / "out" / "generations" / "tuned" / "olympiadbench.jsonl"
    lines = gen_file.read_text().splitlines()
    gen_file.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    resumed = CountingOpen()
    run_eval(models, sets, cfg, tmp_path / "out", reward_fn=parity_reward, open_fn=resumed)
    assert (resumed.opened, resumed.prompts) == (1, 1)

    # other sampling settings never mix into an existing cache
    with pytest.raises(CacheMismatch, match=r"temperature: 1.0 -> 0.5"):
        run_eval(models, sets, _cfg(temperature=0.5), tmp_path / "out", reward_fn=parity_reward)


def test_toy_set_is_the_training_held_out_split():
    from dsrl_fast.data.toy import make_addition_problems

    (spec,) = parse_data_specs("toy")
    held = load_eval_set(spec)
    drawn = make_addition_problems(7200, seed=0)
    assert held.toy and [p.prompt_text for p in held.problems] == [p.prompt_text for p in drawn[7000:]]
    assert not {p.prompt_text for p in held.problems} & {p.prompt_text for p in drawn[:7000]}
    assert len(load_eval_set(spec, limit=5).problems) == 5


@needs_data
def test_benchmark_formats_on_shared_files():
    for name in BENCHMARKS:
        (spec,) = parse_data_specs(name)
        problems = load_eval_set(spec, data_dir=DATA_DIR, limit=3).problems
        assert len(problems) == 3 and all(p.prompt_text.strip() and p.answer.strip() for p in problems), name
    (olympiad,) = parse_data_specs("olympiadbench")
    first = json.loads((DATA_DIR / "benchmarks/olympiadbench/test.jsonl").open().readline())
    answers = first["final_answer"]  # a list, or a list rendered as a string
    answers = ast.literal_eval(answers) if isinstance(answers, str) else answers
    assert load_eval_set(olympiad, data_dir=DATA_DIR, limit=1).problems[0].answer == ", ".join(answers)
    (amc,) = parse_data_specs("amc")
    assert amc.label == "amc23" and load_eval_set(amc, data_dir=DATA_DIR, limit=1).problems[0].answer == "27"
    (minerva,) = parse_data_specs("minerva")
    first = json.loads((DATA_DIR / "benchmarks/minerva_math/test.jsonl").open().readline())
    assert load_eval_set(minerva, data_dir=DATA_DIR, limit=1).problems[0].answer in first["solution"]


def test_data_specs(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"q": "1+1?", "a": 2}\n{"q": "2+2?", "a": 4.0}\n')
    specs = parse_data_specs(f"aime2024, custom={path}, {path}, math500=hf:HuggingFaceH4/MATH-500:test")
    assert [(s.label, s.benchmark) for s in specs] == [("aime24", "aime24"), ("custom", None), ("mine", None),
                                                      ("math500", "math500")]
    problems = load_eval_set(specs[1], problem_key="q", answer_key="a").problems
    assert [(p.prompt_text, p.answer) for p in problems] == [("1+1?", "2"), ("2+2?", "4")]
    with pytest.raises(ValueError, match="missing field 'problem'"):
        load_eval_set(specs[2])
    with pytest.raises(ValueError, match="labels must be distinct"):
        parse_data_specs(f"{path},mine={path}")
    with pytest.raises(ValueError, match="data label must use"):
        parse_data_specs(f"my data={path}")


def test_ks_and_options():
    assert parse_ks("1,2,4,...,256") == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert parse_ks("1,2,3,...,6") == (1, 2, 3, 4, 5, 6)
    assert parse_ks("8, 1, 2") == (8, 1, 2)
    for bad in ("1,2,...,8", "1,2,4,...,100", "a,b", "", "1,2,4,...,"):
        with pytest.raises(ValueError, match="k must be"):
            parse_ks(bad)
    cfg = parse_overrides(["ks=1,2,4,...,16", "template=null", "limit=3", "top_p=0.9"], {"n": 16})
    assert (cfg.ks, cfg.template, cfg.limit, cfg.top_p, cfg.n) == ((1, 2, 4, 8, 16), None, 3, 0.9, 16)
    assert parse_overrides(["template=123"]).template == "123"
    with pytest.raises(TypeError, match="n must be int, got float 2.5"):
        parse_overrides(["n=2.5"])
    with pytest.raises(ValueError, match="top_p must be in"):
        parse_overrides(["top_p=0"])
    with pytest.raises(ValueError, match="engine must be one of"):
        parse_overrides(["engine=tgi"])


def test_model_labels(tmp_path):
    run = tmp_path / "run" / "checkpoints" / "step_000040" / "hf"
    run.mkdir(parents=True)
    with pytest.raises(ValueError, match="must be a Hugging Face model directory"):
        parse_model_specs([str(run)])
    (run / "config.json").write_text("{}")
    (spec,) = parse_model_specs([str(run)])
    assert spec.label == "run-step_000040"
    assert parse_model_specs(["base=Qwen/Qwen3-4B"])[0] == ModelSpec("base", "Qwen/Qwen3-4B")
    with pytest.raises(ValueError, match="labels must be distinct"):
        parse_model_specs([f"a={run}", f"a={run}"])


def _result(model: str, bench: str, thoughts: ThoughtCounts, cap: int = 8192) -> BenchmarkResult:
    return BenchmarkResult(model, bench, 1, 1, 0.0, {1: 0.0}, {1: 0.0}, 1.0, 0.0, thoughts,
                           RowSettings("hendrycks_math", cap, 1.0, 1.0))


def test_defaults_are_the_papers_and_tables_name_them():
    cfg = EvalConfig()
    assert (cfg.max_new_tokens, cfg.reward, cfg.temperature, cfg.top_p, cfg.n) == (8192, "hendrycks_math", 1.0, 1.0,
                                                                                    32)
    rows = [_result("base", "b1", ThoughtCounts(1, 1, 1)), _result("small", "b1", ThoughtCounts(1, 1, 1), cap=2000)]
    assert settings_line(rows) == ("scorer hendrycks_math · length cap 8192 tokens (small: 2000 tokens) · n = 1 · "
                                   "temperature 1.0 · top_p 1.0")


def test_thought_ratios_compare_with_the_first_model():
    results = [_result("base", "b1", ThoughtCounts(1, 2, 17)), _result("rl", "b1", ThoughtCounts(6, 4, 10)),
               _result("base", "b2", ThoughtCounts(0, 1, 1)), _result("rl", "b2", ThoughtCounts(1, 1, 2))]
    ratios = thought_ratios(results)
    assert ratios[("rl", "b1")] == pytest.approx({"transition": 6.0, "reflection": 2.0})
    assert ratios[("base", "b1")] == {"transition": 1.0, "reflection": 1.0}
    assert ratios[("rl", "b2")]["transition"] is None  # the base model had no transition step
    assert ratios[("rl", "b2")]["reflection"] == pytest.approx(0.5)


class ScriptedEngine:
    """Answers prompt [i] with n responses [i, j]; j-th sample of problem i is 'correct' when j < i % (n + 1)."""

    def generate(self, prompts, sampling):
        from dsrl_fast.rollout.base import Rollout

        return [Rollout(p, [prompt[0], j], [0.0, 0.0], True) for p, prompt in enumerate(prompts)
                for j in range(sampling.n)]


class PairTokenizer:
    def batch_decode(self, ids, skip_special_tokens=True):
        return [f"{i}:{j}" for i, j in ids]


def scripted_reward(responses, references):
    return [float(int(r.split(":")[1]) < int(ref)) for r, ref in zip(responses, references)]


def test_periodic_evaluation_matches_pass_at_k_and_splits_over_ranks():
    from dsrl_fast.data.problems import Problem
    from dsrl_fast.eval.pass_at_k import mean_pass_at_k
    from dsrl_fast.eval.periodic import EvalTask, evaluate_tasks
    from dsrl_fast.rollout.base import SamplingConfig

    n = 5
    problems = [Problem(f"q{i}", str(i % (n + 1))) for i in range(7)]
    task = EvalTask("held_out", problems, [[i] for i in range(7)])
    sampling = SamplingConfig(n=n, max_new_tokens=2, seed=3)
    one = evaluate_tasks(ScriptedEngine(), PairTokenizer(), [task, EvalTask("empty", [], [])], scripted_reward,
                         sampling=sampling, ks=(1, 2, 8, 4))
    correct = [i % (n + 1) for i in range(7)]
    assert set(one) == {"held_out/avg@5", "held_out/pass@1", "held_out/pass@2", "held_out/pass@4"}
    assert one["held_out/avg@5"] == pytest.approx(sum(correct) / (7 * n))
    for k in (1, 2, 4):
        assert one[f"held_out/pass@{k}"] == pytest.approx(mean_pass_at_k(correct, n, k))

    # two ranks: each samples its block, the sums meet in `reduce`
    partial = []
    for rank in (0, 1):
        evaluate_tasks(ScriptedEngine(), PairTokenizer(), [task], scripted_reward, sampling=sampling, ks=(1, 2, 4),
                       rank=rank, world_size=2, reduce=lambda sums: partial.append(sums) or sums)
    summed = [a + b for a, b in zip(*partial)]
    assert summed[1] == 7 and summed[0] / 7 == pytest.approx(one["held_out/avg@5"])
    assert summed[2 + 2] / 7 == pytest.approx(one["held_out/pass@4"])
    with pytest.raises(ValueError, match="rank must be in"):
        evaluate_tasks(ScriptedEngine(), PairTokenizer(), [task], scripted_reward, sampling=sampling, rank=2,
                       world_size=2)


def test_training_evaluates_n_samples_on_several_sets(tmp_path):
    from dsrl_fast.train.config import load_config
    from dsrl_fast.train.metrics_log import read_metrics
    from dsrl_fast.train.trainer import train

    extra = tmp_path / "sums.jsonl"
    extra.write_text("".join(json.dumps({"problem": f"Compute {a}+{b}.", "answer": a + b}) + "\n"
                             for a, b in ((31, 42), (55, 17), (60, 29))))
    cfg = load_config(None, [
        "steps=2", "eval_every=1", "sft.steps=3", "sft.batch_size=8", "prompts_per_step=2", "rollout.n=2", "data.toy_low=10",
        "data.toy_high=19", "data.toy_train_size=20", "data.eval_size=3", "eval_n=4", f"eval_benchmarks=sums={extra}",
        "sft.target_accuracy=null",
        "progress=false", "reward=exact_match", f"output_dir={tmp_path / 'run'}", "checkpoint_every=0",
    ])
    train(cfg)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/held_out/avg@4" in r]
    assert len(evals) == 1 and evals[0]["step"] == 0  # after step 0; the final evaluation goes to the summary
    row = evals[0]
    assert set(k for k in row if k.startswith("eval/")) == {
        f"eval/{s}/{m}" for s in ("held_out", "sums") for m in ("avg@4", "pass@1", "pass@2", "pass@4")}
    assert row["eval_accuracy"] == row["eval/held_out/avg@4"]
    for s in ("held_out", "sums"):
        assert row[f"eval/{s}/pass@1"] == pytest.approx(row[f"eval/{s}/avg@4"])  # 0/1 rewards
        assert row[f"eval/{s}/pass@1"] <= row[f"eval/{s}/pass@2"] <= row[f"eval/{s}/pass@4"]


def test_training_refuses_bad_eval_benchmarks(tmp_path):
    from dsrl_fast.errors import UserError
    from dsrl_fast.eval.periodic import load_benchmarks

    with pytest.raises(UserError, match="eval_benchmarks: .*nosuch.*neither a benchmark"):
        load_benchmarks("nosuch")
    with pytest.raises(UserError, match="must not use the label 'held_out'"):
        load_benchmarks(f"held_out={tmp_path / 'x.jsonl'}")
    assert load_benchmarks(None) == []
