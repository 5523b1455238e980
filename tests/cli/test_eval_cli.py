"""The `dsrl-fast eval` and `dsrl-fast analyze` commands: printed results and one-line user errors (exit 2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsrl_fast.analysis.alignment import gradient_alignment
from dsrl_fast.cli import main
from tests.eval.test_eval import DATA_DIR, build_text_model, needs_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("cli") / "model", seed=0)


@needs_data
def test_cli_eval_prints_the_table(model_dir, tmp_path, capsys):
    base = model_dir
    code = main(["eval", "--model", f"base={base}", "--data", "amc23", "--n", "2", "--k", "1,2",
                 "--output", str(tmp_path / "cli"), "limit=1", "max_new_tokens=4", "engine=hf", "progress=false",
                 f"data_dir={DATA_DIR}", "reward=exact_match"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "### amc23 (1 problems, n = 2)" in printed and "| base |" in printed
    assert "scorer exact_match · length cap 4 tokens · n = 2 · temperature 1.0 · top_p 1.0" in printed
    assert f"plot   : {tmp_path / 'cli' / 'pass_at_k.png'}" in printed


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "toy"], "--model must be given"),
    (["--model", "/no/such/dir", "--data", "toy"], "neither a model directory nor a hub id"),
    (["--model", "/", "--data", "toy"], "must be a Hugging Face model directory (with a config.json)"),
    (["--model", "org/name", "--data", "nosuch"], "is neither a benchmark"),
    (["--model", "org/name", "--data", "math500", "data_dir=/no/such"], "/no/such/benchmarks/math500/test.jsonl"),
    (["--model", "org/name", "--data", "toy", "temprature=1"], "unknown eval option 'temprature'"),
    (["--model", "org/name", "--data", "toy", "--k", "1,2,5,...,9"], "progression"),
    (["--model", "org/name", "--data", "toy", "reward=nosuch"], "reward"),
    (["--model", "org/name"], "--data is required"),
])
def test_cli_user_errors_print_one_line(args, message, capsys):
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsrl-fast eval: error:") and message in err and "\n" not in err


@needs_data
def test_cli_alignment_on_a_benchmark(model_dir, tmp_path, capsys):
    code = main(["analyze", "alignment", "--model", str(model_dir), "--data", "math500", "--n", "2", "--impl", "torch",
                 "--output", str(tmp_path / "align"), "limit=2", "max_new_tokens=5", "engine=hf", "progress=false",
                 f"data_dir={DATA_DIR}"])
    printed = capsys.readouterr().out
    assert code == 0 and "4 rollouts of model on math500" in printed
    saved = json.loads((tmp_path / "align" / "alignment.json").read_text())
    assert saved["summary"]["rollouts"] == 4 and len(saved["rollouts"]) == 4
    assert saved["settings"]["marginal_prefix"] == [AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(
        "<|im_start|>")]
    first = saved["rollouts"][0]
    assert len(first["token_diff"]) == first["response_tokens"] and first["problem"] == 0
    assert math.isclose(first["cosine"], first["dot"] / (first["norm_marginal"] * first["norm_conditional"]),
                        rel_tol=1e-9)
    dots = [r["dot"] for r in saved["rollouts"]]
    assert saved["summary"]["nonnegative_dot_share"] == sum(d >= 0 for d in dots) / 4
    assert (tmp_path / "align" / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the sampled responses are in the file: every per-rollout number is recomputed from it alone
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = saved["problems"]
    assert [p["index"] for p in problems] == [0, 1] and saved["settings"]["max_new_tokens"] == 5
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for r in saved["rollouts"]:
        prompt = problems[r["problem"]]["prompt_ids"]
        assert problems[r["problem"]]["problem"] in tokenizer.decode(prompt)
        assert len(r["response_ids"]) == r["response_tokens"] and isinstance(r["finished"], bool)
        assert r["response"] == tokenizer.decode(r["response_ids"], skip_special_tokens=True)
        again = gradient_alignment(model, prompt, r["response_ids"],
                                   marginal_prefix=saved["settings"]["marginal_prefix"], impl="torch")
        assert again.dot == pytest.approx(r["dot"], rel=1e-5, abs=1e-6)
        assert again.cosine == pytest.approx(r["cosine"], rel=1e-5, abs=1e-6)
        assert again.logp_conditional == pytest.approx(r["logp_conditional"], abs=1e-5)
        assert again.logp_marginal == pytest.approx(r["logp_marginal"], abs=1e-5)
        assert again.token_diff == pytest.approx(r["token_diff"], abs=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["alignment", "--model", "org/name", "--data", "toy,amc23"], "one benchmark or file"),
    (["alignment", "--model", "org/name", "--data", "toy", "--marginal-prefix", "a,b"], "comma-separated token ids"),
    (["behaviours", "--judge", "org/name", "--generations", "/no/such"], "holds no <model>/<benchmark>.jsonl"),
])
def test_cli_analyze_user_errors(args, message, capsys):
    assert main(["analyze", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsrl-fast analyze: error:") and message in err and "\n" not in err
