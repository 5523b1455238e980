"""Problem loading (JSONL, Parquet, HF datasets), the six benchmarks, the resumable sampler."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from dsrl_fast.data.problems import Problem, PromptSampler, load_hf_problems, load_problems
from dsrl_fast.reward import HendrycksMathReward, MathVerifyReward
from tests.paths import REPO_ROOT

BENCHMARKS = REPO_ROOT / ".." / "shared" / "data" / "benchmarks"

# name -> (problem_key, answer_key, answer_mode, number of problems)
BENCHMARK_SPECS = {
    "math500": ("problem", "answer", "field", 500),
    "aime24": ("problem", "answer", "field", 30),
    "aime25": ("problem", "answer", "field", 30),
    "amc23": ("problem", "answer", "field", 40),
    "minerva_math": ("problem", "solution", "boxed", 272),
    "olympiadbench": ("question", "final_answer", "list", 675),
}

needs_benchmarks = pytest.mark.skipif(
    not BENCHMARKS.is_dir(), reason=f"benchmark files not found at {BENCHMARKS} (shared data folder missing)"
)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_fields_and_meta(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "1+1?", "a": 2, "id": 7}, {"q": "x?", "a": 27.0}])
    problems = load_problems(path, problem_key="q", answer_key="a")
    assert problems == [Problem("1+1?", "2", {"id": 7}), Problem("x?", "27", {})]


def test_numbers_keep_their_exact_text(tmp_path):
    """JSON numbers become the exact decimal their text spells, never a float's expansion."""
    texts = ("1e30", "2.50", "7.0", "-0.0", "1.5e-3", "0.1", "12345678901234567890123", "-17", "1E+2",
             "9007199254740993.0")
    lines = ['{"problem": "p", "answer": ' + text + ', "level": 3, "w": 0.5, "v": [1, 2.0]}' for text in texts]
    (tmp_path / "n.jsonl").write_text("\n".join(lines) + "\n")
    problems = load_problems(tmp_path / "n.jsonl")
    assert [p.answer for p in problems] == ["1" + "0" * 30, "2.5", "7", "0", "0.0015", "0.1",
                                            "12345678901234567890123", "-17", "100", "9007199254740993"]
    assert problems[0].meta == {"level": 3, "w": 0.5, "v": [1, 2.0]}
    assert type(problems[0].meta["level"]) is int and type(problems[0].meta["w"]) is float


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("NaN", "must be a finite number, got NaN"),
        ("Infinity", "must be a finite number, got Infinity"),
        ("-Infinity", "must be a finite number, got -Infinity"),
        ("true", "must be a string or a number, got True"),
        ("null", "must be a string or a number, got None"),
        ("1e5000", "more than 1000 digits to write exactly"),
        ('""', "is an empty answer"),
        ('" \\t "', "is an empty answer"),
    ],
)
def test_bad_answers_name_the_line(tmp_path, text, message):
    (tmp_path / "b.jsonl").write_text('{"problem": "ok", "answer": "1"}\n{"problem": "p", "answer": ' + text + "}\n")
    with pytest.raises(ValueError, match=rf"b\.jsonl, line 2: field 'answer' .*{message}"):
        load_problems(tmp_path / "b.jsonl")


def test_empty_answers_skipped_with_a_count(tmp_path, caplog):
    fields = write_jsonl(tmp_path / "f.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": " "},
                                                {"problem": "c", "answer": "\t"}, {"problem": "d", "answer": "4"}])
    lists = write_jsonl(tmp_path / "l.jsonl", [{"problem": "a", "answer": ["1"]}, {"problem": "b", "answer": ["2", ""]},
                                               {"problem": "c", "answer": "['3', '4']"}])
    with pytest.raises(ValueError, match="line 2: field 'answer' is an empty answer"):
        load_problems(fields)
    with pytest.raises(ValueError, match="line 2: field 'answer' is an empty answer"):
        load_problems(lists, answer_mode="list")
    with caplog.at_level(logging.WARNING, logger="dsrl_fast.data.problems"):
        assert [p.prompt_text for p in load_problems(fields, empty_answers="skip")] == ["a", "d"]
        assert [p.answer for p in load_problems(lists, answer_mode="list", empty_answers="skip")] == ["1", "3, 4"]
    assert "f.jsonl: skipped 2 rows with an empty answer" in caplog.text
    assert "l.jsonl: skipped 1 rows with an empty answer" in caplog.text
    with pytest.raises(ValueError, match="empty_answers must be one of"):
        load_problems(fields, empty_answers="drop")


def test_train_names_a_key_it_accepts_for_empty_answers(tmp_path, caplog):
    """The hint used to say "pass empty_answers='skip'", which `dsrl-fast train` accepted under no name."""
    import subprocess

    pytest.importorskip("transformers", reason="dsrl-fast train needs the train extra")
    from dsrl_fast.train.config import load_config
    from dsrl_fast.train.setup import load_train_eval_problems

    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "Compute 1+2.", "answer": "3"},
                                              {"problem": "Compute 2+2.", "answer": " "}])
    root = REPO_ROOT

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dsrl_fast.cli", "train", *args], cwd=root, text=True,
                              capture_output=True, timeout=120, check=False)

    refused = cli(f"data.train_path={path}", f"output_dir={tmp_path / 'run'}")
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"dsrl-fast train: error: data.train_path: {path}, line 2: field 'answer' is an empty answer (' '); fix the "
        "row or pass data.empty_answers=skip to leave such rows out"]
    typed = cli(f"data.train_path={path}", "data.empty_answers=skip", "--print-config")
    assert typed.returncode == 0 and "  empty_answers: skip\n" in typed.stdout, typed.stderr
    with caplog.at_level(logging.WARNING, logger="dsrl_fast.data.problems"):
        train, held_out = load_train_eval_problems(load_config(None, [f"data.train_path={path}",
                                                                      "data.empty_answers=skip"]))
    assert [p.answer for p in train] == ["3"] and held_out == []
    assert "t.jsonl: skipped 1 rows with an empty answer" in caplog.text
    with pytest.raises(ValueError, match=r"data.empty_answers must be one of \('error', 'skip'\), got 'drop'"):
        load_config(None, ["data.empty_answers=drop"])


def test_utf8_bom_accepted_and_bad_bytes_located(tmp_path):
    body = '{"problem": "π?", "answer": "½"}\n{"problem": "q", "answer": "2"}\n'.encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + body)
    assert [p.answer for p in load_problems(tmp_path / "bom.jsonl")] == ["½", "2"]
    (tmp_path / "latin1.jsonl").write_bytes(body + '{"problem": "caf\xe9", "answer": "3"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 3, column 17: not UTF-8 \(byte 0xe9"):
        load_problems(tmp_path / "latin1.jsonl")
    (tmp_path / "midbom.jsonl").write_bytes(body + b"\xef\xbb\xbf" + body)
    with pytest.raises(ValueError, match="line 3: invalid JSON"):
        load_problems(tmp_path / "midbom.jsonl")


def test_answer_modes(tmp_path):
    rows = [
        {"problem": "p1", "solution": "so \\boxed{1} hence \\boxed{\\frac{1}{2}}.", "final": "['$2$']"},
        {"problem": "p2", "solution": "\\boxed{\\{1,2\\}}", "final": ["1", "3"]},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    boxed = load_problems(path, answer_key="solution", answer_mode="boxed")
    assert [p.answer for p in boxed] == ["\\frac{1}{2}", "\\{1,2\\}"]
    listed = load_problems(path, answer_key="final", answer_mode="list")
    assert [p.answer for p in listed] == ["$2$", "1, 3"]
    assert load_problems(path, answer_key="final", answer_mode="list", limit=1) == listed[:1]


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_problems(tmp_path / "nope.jsonl")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"must end in \.jsonl or \.parquet"):
        load_problems(tmp_path / "p.csv")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no problems"):
        load_problems(tmp_path / "empty.jsonl")


def test_missing_field_names_line_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "id": 3}])
    with pytest.raises(ValueError, match=r"line 2: missing field 'answer' \(fields present: \['id', 'problem'\]\)"):
        load_problems(path)


def test_malformed_rows(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_problems(tmp_path / "bad.jsonl")
    path = write_jsonl(tmp_path / "nobox.jsonl", [{"problem": "a", "solution": "the answer is 3"}])
    with pytest.raises(ValueError, match="line 1: field 'solution' has no complete"):
        load_problems(path, answer_key="solution", answer_mode="boxed")
    path = write_jsonl(tmp_path / "notlist.jsonl", [{"problem": "a", "answer": "[oops"}])
    with pytest.raises(ValueError, match="not a list literal"):
        load_problems(path, answer_mode="list")
    path = write_jsonl(tmp_path / "noprompt.jsonl", [{"problem": "  ", "answer": "1"}])
    with pytest.raises(ValueError, match="'problem' must be a non-empty string"):
        load_problems(path)
    with pytest.raises(ValueError, match="answer_mode must be one of"):
        load_problems(path, answer_mode="regex")
    with pytest.raises(ValueError, match="limit must be None or an int >= 1"):
        load_problems(path, limit=0)


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed")
    import pyarrow.parquet as pq

    rows = [{"problem": "p1", "answer": "1", "level": 3}, {"problem": "p2", "answer": "x^2", "level": 5}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert load_problems(tmp_path / "p.parquet") == [
        Problem("p1", "1", {"level": 3}),
        Problem("p2", "x^2", {"level": 5}),
    ]
    floats = [{"problem": "p", "answer": v} for v in (7.0, 1e30, 0.1, -2.5)]
    pq.write_table(pa.Table.from_pylist(floats), tmp_path / "f.parquet")
    assert [p.answer for p in load_problems(tmp_path / "f.parquet")] == ["7", "1" + "0" * 30, "0.1", "-2.5"]
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": float("nan")}]), tmp_path / "nan.parquet")
    with pytest.raises(ValueError, match="row 0: field 'answer' must be a finite number, got nan"):
        load_problems(tmp_path / "nan.parquet")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs pyarrow"):
        load_problems(tmp_path / "p.parquet")


def test_hf_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "q0", "final_answer": ["3"]}, {"question": "q1", "final_answer": ["4"]}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    problems = load_hf_problems(
        "org/set", split="test", problem_key="question", answer_key="final_answer", answer_mode="list"
    )
    assert calls == [("org/set", None, "test")]
    assert problems == [Problem("q0", "3", {}), Problem("q1", "4", {})]


def test_hf_datasets_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs `datasets`"):
        load_hf_problems("org/set")


@needs_benchmarks
@pytest.mark.parametrize("name", sorted(BENCHMARK_SPECS))
def test_benchmark_loads(name):
    problem_key, answer_key, mode, count = BENCHMARK_SPECS[name]
    problems = load_problems(BENCHMARKS / name / "test.jsonl", problem_key, answer_key, mode)
    assert len(problems) == count
    assert all(p.prompt_text.strip() and p.answer.strip() for p in problems)


@pytest.fixture(scope="module")
def benchmark_answers() -> dict[str, list[str]]:
    answers = {}
    for name, (problem_key, answer_key, mode, _) in BENCHMARK_SPECS.items():
        problems = load_problems(BENCHMARKS / name / "test.jsonl", problem_key, answer_key, mode)
        answers[name] = [p.answer for p in problems]
    return answers


def check_self_verification(answers_by_name: dict[str, list[str]], fast_path: bool) -> None:
    with MathVerifyReward(timeout_s=10.0, num_workers=2, fast_path=fast_path) as reward:
        for name, answers in answers_by_name.items():
            scores = reward(["\\boxed{" + a + "}" for a in answers], answers)
            failures = [a for a, s in zip(answers, scores, strict=True) if s != 1.0]
            assert len(failures) <= 0.05 * len(answers), f"{name}: {len(failures)} failures: {failures[:10]}"


@needs_benchmarks
def test_benchmark_answers_verify_against_themselves(benchmark_answers):
    """A "\\boxed{ref}" response scores 1 for >= 95% of every benchmark (fast path on)."""
    check_self_verification(benchmark_answers, fast_path=True)


@needs_benchmarks
def test_benchmark_answers_pass_the_hendrycks_check(benchmark_answers):
    """Every one of the 1547 "\\boxed{ref}" responses scores 1 under hendrycks_math (extraction and normalization
    agree on both sides; amc23's float answers load as integers)."""
    reward = HendrycksMathReward()
    for name, answers in benchmark_answers.items():
        scores = reward(["\\boxed{" + a + "}" for a in answers], answers)
        assert scores == [1.0] * len(answers), (name, [a for a, s in zip(answers, scores, strict=True) if s != 1.0])
    assert benchmark_answers["amc23"][0] == "27" and all("." not in a for a in benchmark_answers["amc23"])


@needs_benchmarks
def test_benchmark_answers_math_verify_sample(benchmark_answers):
    """Every 20th answer through math-verify itself (fast path off): it must parse the references."""
    check_self_verification({k: v[::20] for k, v in benchmark_answers.items()}, fast_path=False)


@needs_benchmarks
@pytest.mark.slow
def test_benchmark_answers_math_verify_all(benchmark_answers):
    """All 1547 answers through math-verify (about a minute on 2 cores)."""
    check_self_verification(benchmark_answers, fast_path=False)


def batches(sampler: PromptSampler, k: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(k)]


def flat(lists: list[list[int]]) -> list[int]:
    return [x for sub in lists for x in sub]


def test_sampler_epochs_are_permutations():
    sampler = PromptSampler(n=10, batch_size=5, seed=3)
    epoch0, epoch1 = flat(batches(sampler, 2)), flat(batches(sampler, 2))
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert sampler.epoch == 2 and sampler.position == 0
    assert batches(PromptSampler(10, 5, seed=3), 4) == batches(PromptSampler(10, 5, seed=3), 4)
    assert batches(PromptSampler(10, 5, seed=3), 2) != batches(PromptSampler(10, 5, seed=4), 2)


def test_sampler_batches_cross_epochs():
    sampler = PromptSampler(n=7, batch_size=3, seed=0)
    indices = flat(batches(sampler, 7))  # 21 indices = exactly 3 epochs
    assert all(len(b) == 3 for b in batches(PromptSampler(7, 3, 0), 7))
    for e in range(3):
        assert sorted(indices[7 * e : 7 * (e + 1)]) == list(range(7))
    assert PromptSampler(n=2, batch_size=5, seed=0).next_batch().count(0) >= 2


@pytest.mark.parametrize("k", [0, 1, 3, 4, 9])
def test_sampler_resume(k):
    reference = PromptSampler(n=11, batch_size=4, seed=5)
    expected = batches(reference, k + 6)
    run = PromptSampler(n=11, batch_size=4, seed=5)
    batches(run, k)
    state = json.loads(json.dumps(run.state_dict()))
    resumed = PromptSampler(n=11, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    assert batches(resumed, 6) == expected[k:]


def test_sampler_validation():
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        PromptSampler(0, 2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        PromptSampler(3, 0)
    sampler = PromptSampler(5, 2, seed=1)
    with pytest.raises(ValueError, match=r"state\['seed'\] must equal this sampler's seed=1, got 2"):
        sampler.load_state_dict({**sampler.state_dict(), "seed": 2})
    with pytest.raises(ValueError, match="position"):
        sampler.load_state_dict({**sampler.state_dict(), "position": 5})
