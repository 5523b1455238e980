"""The eval cache never reports the wrong model: it is keyed by the model files' content, and every record is checked
when it is read (a damaged line is reported with its file, line and reason, and exactly its problem is generated
again); a file that is not a cache is refused in one line. Real runs of `run_eval` / `dsrl-fast eval` on a tiny
byte-level Qwen3 (HF engine) and the first problems of the shipped math500 file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dsrl_fast.cli import main
from dsrl_fast.data.problems import Problem
from dsrl_fast.eval.benchmarks import parse_data_specs
from dsrl_fast.eval.cache import FORMAT, CacheMismatch, GenerationCache
from dsrl_fast.eval.config import EvalConfig
from dsrl_fast.eval.fingerprint import model_digest
from dsrl_fast.eval.generate import encode_prompts
from dsrl_fast.eval.models import ModelSpec, open_engine
from dsrl_fast.eval.runner import DIGESTS, load_eval_sets, run_eval
from tests.eval.test_eval import DATA_DIR, build_text_model, needs_data, parity_reward

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), needs_data]

PROBLEMS = 4


class PromptLog:
    """open_engine that records the prompts each engine was asked for."""

    def __init__(self) -> None:
        self.opened = 0
        self.prompts: list[list[int]] = []

    def __call__(self, *args, **kwargs):
        self.opened += 1
        engine = open_engine(*args, **kwargs)
        log = self

        class Logged:
            def generate(self, prompts, sampling):
                log.prompts += [list(p) for p in prompts]
                return engine.generate(prompts, sampling)

            def close(self):
                engine.close()

        return Logged()


def _cfg() -> EvalConfig:
    return EvalConfig(n=4, ks=(1, 2, 4), max_new_tokens=6, limit=PROBLEMS, engine="hf", data_dir=str(DATA_DIR),
                      progress=False, batch_size=1)


def _run(model: Path, out: Path, opener: PromptLog | None = None):
    sets = load_eval_sets(parse_data_specs("math500"), _cfg())
    return run_eval([ModelSpec("m", str(model))], sets, _cfg(), out, reward_fn=parity_reward,
                    open_fn=opener or open_engine)


def _lines(out: Path) -> list[str]:
    return (out / "generations" / "m" / "math500.jsonl").read_text(encoding="utf-8").splitlines()


def _asked(opener: PromptLog, out: Path) -> list[int]:
    """The problem indices the engine was asked for (prompts matched against the cached questions' prompts)."""
    records = [json.loads(line) for line in _lines(out)[1:]]
    tokenizer = AutoTokenizer.from_pretrained(json.loads(_lines(out)[0])["model"])
    by_prompt = {tuple(p): r["index"] for r, p in zip(records, encode_prompts(
        tokenizer, [Problem(r["problem"], "x") for r in records], "qwen3_non_thinking", False))}
    return sorted(by_prompt[tuple(p)] for p in opener.prompts)


@pytest.fixture(scope="module")
def complete(tmp_path_factory) -> tuple[Path, Path]:
    """(model, output directory) of one complete evaluation, shared: tests work on copies."""
    root = tmp_path_factory.mktemp("complete")
    model = build_text_model(root / "model", seed=0)
    _run(model, root / "out")
    return model, root / "out"


@pytest.fixture
def model_dir(complete, tmp_path) -> Path:
    """A copy of the model this test may rewrite."""
    return Path(shutil.copytree(complete[0], tmp_path / "model"))


@pytest.fixture
def done(complete, tmp_path) -> tuple[Path, Path, list[str]]:
    """(model, a copy of the complete output directory, its cache lines)."""
    out = Path(shutil.copytree(complete[1], tmp_path / "out"))
    lines = _lines(out)
    assert len(lines) == 1 + PROBLEMS
    return complete[0], out, lines


def test_new_weights_in_the_same_directory_are_generated_again(done, model_dir, tmp_path, caplog):
    _, out, before = done
    model = model_dir
    first = json.loads(before[0])["settings"]["model_digest"]
    opener = PromptLog()
    _run(model, out, opener)  # the same files at another path: the same model, nothing is generated
    assert opener.opened == 0 and _lines(out) == before
    build_text_model(model, seed=1)  # a new checkpoint written over the old one, same path, same file sizes
    with caplog.at_level(logging.WARNING, logger="dsrl_fast.eval.cache"):
        again = _run(model, out, opener)
    assert opener.opened == 1 and _asked(opener, out) == list(range(PROBLEMS))  # nothing stale reused
    second = json.loads(_lines(out)[0])["settings"]["model_digest"]
    assert second != first and second == model_digest(str(model), tmp_path / "fresh.json")
    stale = out / "generations" / "m" / "stale" / f"math500.{first.removeprefix('sha256:')[:16]}.jsonl"
    assert stale.read_text(encoding="utf-8").splitlines() == before
    assert "the model's files changed since it was written" in caplog.text and str(stale) in caplog.text

    # the numbers are the new model's: the same as a first evaluation of it elsewhere
    fresh = _run(model, tmp_path / "fresh_out")
    assert [r.avg for r in again.results] == [r.avg for r in fresh.results]
    assert _lines(out)[1:] == _lines(tmp_path / "fresh_out")[1:]


def test_unchanged_files_are_not_read_again_but_rewritten_ones_are(model_dir, tmp_path, monkeypatch):
    reads: list[str] = []
    real = hashlib.file_digest

    def counting(f, digest):
        reads.append(Path(f.name).name)
        return real(f, digest)

    monkeypatch.setattr(hashlib, "file_digest", counting)
    sidecar = tmp_path / DIGESTS
    first = model_digest(str(model_dir), sidecar)
    assert "model.safetensors" in reads and "tokenizer.json" in reads and "config.json" in reads
    reads.clear()
    assert model_digest(str(model_dir), sidecar) == first and reads == []  # the pre-check: size, times, inode

    # other weights of the same size, the old modification time put back (as `cp -p` or rsync would): still read
    weights = model_dir / "model.safetensors"
    old = weights.stat()
    build_text_model(tmp_path / "other", seed=5)
    data = (tmp_path / "other" / "model.safetensors").read_bytes()
    assert len(data) == old.st_size
    weights.write_bytes(data)
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert model_digest(str(model_dir), sidecar) != first and reads == ["model.safetensors"]

    sidecar.write_text("{not json")  # a damaged sidecar is ignored: every file is read again
    reads.clear()
    model_digest(str(model_dir), sidecar)
    assert "model.safetensors" in reads and "config.json" in reads


def _damage_and_rerun(done, caplog, damage) -> tuple[list[int], str, list[str], list[str]]:
    """Apply `damage` to the cache lines, rerun; (problems generated again, warnings, lines before, lines after)."""
    model, out, before = done
    path = out / "generations" / "m" / "math500.jsonl"
    path.write_bytes(damage(path.read_bytes()))
    opener = PromptLog()
    with caplog.at_level(logging.WARNING, logger="dsrl_fast.eval.cache"):
        _run(model, out, opener)
    after = _lines(out)
    assert len(after) == 1 + PROBLEMS and (out / "generations" / "m" / "math500.jsonl.invalid").is_file()
    assert sorted(json.loads(line)["index"] for line in after[1:]) == list(range(PROBLEMS))
    return _asked(opener, out), caplog.text, before, after


def _replace_line(number: int, new: bytes):
    def damage(data: bytes) -> bytes:
        lines = data.split(b"\n")
        lines[number - 1] = new
        return b"\n".join(lines)
    return damage


def test_a_truncated_file_names_its_line_and_regenerates_what_it_lost(done, caplog):
    def cut(data: bytes) -> bytes:  # cut in the middle of the third record (line 4)
        lines = data.split(b"\n")
        return b"\n".join(lines[:3]) + b"\n" + lines[3][:40]

    asked, warnings, before, after = _damage_and_rerun(done, caplog, cut)
    assert asked == [2, 3]  # the cut record and the one after it, nothing else
    assert "math500.jsonl line 4: cut short (no line end: the write was interrupted); problem 2 is generated again" \
        in warnings
    assert after[:3] == before[:3]  # the intact problems are reused as they were


def test_a_garbage_line_names_its_line_and_regenerates_only_its_problem(done, caplog):
    asked, warnings, before, after = _damage_and_rerun(done, caplog, _replace_line(3, b"garbage{"))
    assert asked == [1]
    assert ("math500.jsonl line 3: not JSON (Expecting value at column 1: cut short or overwritten); the problem it "
            "held is generated again") in warnings
    assert [line for line in after if json.loads(line).get("index") != 1] == [
        line for line in before if json.loads(line).get("index") != 1]


def test_a_shortened_response_list_names_its_line_and_regenerates_only_its_problem(done, caplog):
    record = json.loads(done[2][2])
    record["responses"] = record["responses"][:-1]
    asked, warnings, _, _ = _damage_and_rerun(done, caplog, _replace_line(3, json.dumps(record).encode()))
    assert asked == [1]
    assert "line 3: responses holds 3 entries, the settings ask for n = 4; problem 1 is generated again" in warnings


def test_a_non_utf8_line_names_its_line_and_regenerates_only_its_problem(done, caplog):
    line = done[2][4].encode()
    at = line.index(b'"responses": ["') + len(b'"responses": ["')
    asked, warnings, _, _ = _damage_and_rerun(done, caplog, _replace_line(5, line[:at] + b"\xff" + line[at:]))
    assert asked == [3]
    assert f"line 5: not UTF-8 (byte 0xff at column {at + 1}); problem 3 is generated again" in warnings


def test_a_file_that_is_not_a_cache_is_refused_in_one_line(done, tmp_path, capsys):
    model, out, before = done
    path = out / "generations" / "m" / "math500.jsonl"
    args = ["eval", "--model", f"m={model}", "--data", "math500", "--n", "4", "--k", "1,2,4", "--output", str(out),
            f"limit={PROBLEMS}", "max_new_tokens=6", "engine=hf", "progress=false", f"data_dir={DATA_DIR}",
            "batch_size=1"]
    for header, why in ((b"\xfe\xff{", "not UTF-8 (byte 0xfe at column 1)"),
                        (b'{"format": "something else"}', "no dsrl_fast.eval.generations/2 header")):
        path.write_bytes(header + b"\n" + "\n".join(before[1:]).encode() + b"\n")
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dsrl-fast eval: error:") and why in err and "\n" not in err, err
    with pytest.raises(CacheMismatch, match="temperature: 1.0 -> 0.5"):  # other sampling settings: refused too
        path.write_text("\n".join(before) + "\n")
        sets = load_eval_sets(parse_data_specs("math500"), _cfg())
        cfg = _cfg()
        cfg.temperature = 0.5
        run_eval([ModelSpec("m", str(model))], sets, cfg, out, reward_fn=parity_reward)


def test_a_cache_keyed_by_path_is_set_aside(done, caplog):
    model, out, before = done
    path = out / "generations" / "m" / "math500.jsonl"
    header = json.loads(before[0])
    header["format"] = "dsrl_fast.eval.generations/1"
    path.write_text("\n".join([json.dumps(header), *before[1:]]) + "\n")
    opener = PromptLog()
    with caplog.at_level(logging.WARNING, logger="dsrl_fast.eval.cache"):
        _run(model, out, opener)
    assert _asked(opener, out) == list(range(PROBLEMS))
    assert "before caches were keyed by the model's content" in caplog.text
    assert (out / "generations" / "m" / "stale" / "math500.unkeyed.jsonl").is_file()


SETTINGS = {"model_digest": "sha256:00", "data": "d", "n": 2, "max_new_tokens": 5}


def _record(index: int, **changes) -> str:
    record = {"index": index, "problem": f"q{index}", "responses": ["a", "b"], "num_tokens": [1, 5],
              "finished": [True, False], **changes}
    return json.dumps(record)


@pytest.mark.parametrize(("line", "reason", "fate"), [
    (_record(0), "problem 0 again (first on line 2)", "problem 0 is kept from line 2"),
    (json.dumps({"index": 2, "problem": "q2"}), "missing fields ['responses', 'num_tokens', 'finished']",
     "problem 2 is generated again"),
    (_record(2, extra=1), "unexpected fields ['extra']", "problem 2 is generated again"),
    (_record(2, num_tokens=[1, 6]), "num_tokens must be a list of ints in [0, 5]", "problem 2 is generated again"),
    (_record(2, finished=[1, 0]), "finished must be a list of booleans", "problem 2 is generated again"),
    (_record(2, responses=["a", None]), "responses must be a list of strings", "problem 2 is generated again"),
    (_record(-1), "index must be an int >= 0, got -1", "the problem it held is generated again"),
    ("[1, 2]", "a JSON list, not a record", "the problem it held is generated again"),
    ("", "not JSON (Expecting value at column 1", "the problem it held is generated again"),
])
def test_every_record_is_checked(tmp_path, caplog, line, reason, fate):
    """GenerationCache alone (no model): each kind of bad line is named with its reason, the others are kept."""
    path = tmp_path / "c.jsonl"
    header = json.dumps({"format": FORMAT, "settings": SETTINGS, "model": "m"})
    path.write_text("\n".join([header, _record(0), line, _record(1)]) + "\n")
    with caplog.at_level(logging.WARNING, logger="dsrl_fast.eval.cache"):
        cache = GenerationCache(path, SETTINGS, "m")
    assert sorted(cache.done) == [0, 1] and cache.done[0].responses == ["a", "b"]
    assert f"c.jsonl line 3: {reason}" in caplog.text and fate in caplog.text
    assert path.read_text().splitlines() == [header, _record(0), _record(1)]
    assert (tmp_path / "c.jsonl.invalid").read_text().splitlines()[2] == line
