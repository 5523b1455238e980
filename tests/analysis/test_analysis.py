"""The paper's analyses: gradient alignment against plain float64 per-sample gradients, the behaviours judge (prompt,
robust parsing, shares, a judged run) and both `dsrl-fast analyze` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsrl_fast.analysis.alignment import default_marginal_prefix, gradient_alignment
from dsrl_fast.analysis.behaviours import BEHAVIOURS, Judgement, behaviour_shares, judge_prompt, parse_judgement
from dsrl_fast.analysis.run_behaviours import run_behaviours
from dsrl_fast.eval.config import EvalConfig
from dsrl_fast.eval.models import ModelSpec
from dsrl_fast.rollout.base import Rollout
from tests.eval.test_eval import build_text_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # 7 unused vocabulary rows: V = 260 + 7, not a multiple of any tile
    return build_text_model(tmp_path_factory.mktemp("align") / "model", seed=3, vocab_pad=7)


def _load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def _plain_grad(model: torch.nn.Module, context: list[int], response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat gradient of sum_t log p(y_t | context, y_<t), per-token log-probs) from one ordinary forward pass."""
    model.zero_grad(set_to_none=True)
    ids = torch.tensor(context + response)[None]
    logits = model(input_ids=ids, use_cache=False).logits[0]
    logp = torch.log_softmax(logits[len(context) - 1:-1], dim=-1)
    token = logp.gather(1, torch.tensor(response)[:, None])[:, 0]
    token.sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return grad.double(), token.detach().double()


def _plain_alignment(model, prompt, response, prefix) -> dict[str, object]:
    gc, lc = _plain_grad(model, prompt, response)
    gm, lm = _plain_grad(model, prefix, response)
    return {"dot": float(gc @ gm), "norm_c": float(gc.norm()), "norm_m": float(gm.norm()),
            "cosine": float(gc @ gm / (gc.norm() * gm.norm())), "diff": (lc - lm), "logp_c": float(lc.sum()),
            "logp_m": float(lm.sum())}


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_alignment_matches_float64_per_sample_gradients(model_dir, impl):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prefix = list(default_marginal_prefix(tokenizer))
    assert prefix == [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    model64, model32 = _load(model_dir, torch.float64), _load(model_dir, torch.float32)
    gen = torch.Generator().manual_seed(11)
    vocab = model32.config.vocab_size
    for prompt_len, response_len in ((13, 9), (1, 1), (30, 17)):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        response = torch.randint(0, vocab, (response_len,), generator=gen).tolist()
        ref = _plain_alignment(model64, prompt, response, prefix)  # float64 ground truth
        fp32 = _plain_alignment(model32, prompt, response, prefix)  # plain PyTorch at the test dtype
        ours = gradient_alignment(model32, prompt, response, marginal_prefix=prefix, impl=impl)
        scale = ref["norm_c"] * ref["norm_m"]
        torch_err = abs(fp32["dot"] - ref["dot"]) / scale
        assert abs(ours.dot - ref["dot"]) / scale <= 4 * torch_err + 1e-6, (ours.dot, ref["dot"], fp32["dot"])
        assert ours.cosine == pytest.approx(ref["cosine"], abs=4 * abs(fp32["cosine"] - ref["cosine"]) + 1e-6)
        assert ours.norm_conditional == pytest.approx(ref["norm_c"], rel=1e-5)
        assert ours.norm_marginal == pytest.approx(ref["norm_m"], rel=1e-5)
        assert ours.logp_conditional == pytest.approx(ref["logp_c"], abs=1e-4)
        assert ours.logp_marginal == pytest.approx(ref["logp_m"], abs=1e-4)
        diff = torch.tensor(ours.token_diff, dtype=torch.float64)
        assert diff.shape == (response_len,)
        worst = (diff - ref["diff"]).abs().max()
        assert worst <= 4 * (fp32["diff"] - ref["diff"]).abs().max() + 1e-5, (worst, int((diff - ref["diff"]).abs().argmax()))
    assert all(p.grad is None for p in model32.parameters())


def test_alignment_validation(model_dir):
    model = _load(model_dir, torch.float32)
    with pytest.raises(ValueError, match="response_ids must be a non-empty list"):
        gradient_alignment(model, [1, 2], [], marginal_prefix=[3])
    with pytest.raises(ValueError, match="marginal_prefix must be a non-empty list"):
        gradient_alignment(model, [1, 2], [4], marginal_prefix=[])
    frozen = _load(model_dir, torch.float32).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradient_alignment(frozen, [1], [2], marginal_prefix=[3])


def test_judge_prompt_follows_the_paper():
    prompt = judge_prompt("Step 1.\n\nWait, check.")
    assert prompt.startswith("Below is a chain-of-reasoning generated by a Language Model when attempting to solve a "
                             "math problem. Evaluate this chain-of-reasoning to determine whether it demonstrates "
                             "beneficial problem-solving behaviors that deviate from typical linear, monotonic "
                             "reasoning patterns.")
    assert "<start_of_reasoning>\nStep 1.\n\nWait, check.\n<end_of_reasoning>" in prompt
    for name in ("Backtracking", "Verification", "Subgoal setting", "Enumeration"):
        assert f"{name}:" in prompt
    assert '"behaviour": "", "example": ""' in prompt


@pytest.mark.parametrize(("text", "behaviours", "parsed"), [
    ('[{"behaviour": "Verification", "example": "3*4=12"}]', {"verification"}, True),
    ('```json\n[{"behaviour": "backtracking", "example": "no"}, {"behaviour": "Subgoal Setting", "example": "a"}]\n```',
     {"backtracking", "subgoal setting"}, True),
    ('Sure! {"behavior": "enumeration", "example": "Case 1"} and {"behavior": "verification", "example": "x"}',
     {"enumeration", "verification"}, True),  # one object per behaviour, in prose
    ('[{"behaviour": "none", "example": ""}]', set(), True),
    ('"behaviour": "Backtracking", "example": "let\'s try again"\n"behaviour": "sub-goal setting", "example": ""',
     {"backtracking", "subgoal setting"}, True),  # loose pairs without braces
    ('{"behaviours": ["Verification", "Enumeration"]}', {"verification", "enumeration"}, True),
    ('{"backtracking": true, "verification": false, "enumeration": "yes"}', {"backtracking", "enumeration"}, True),
    ('[{"behaviour": "creativity", "example": "?"}]', set(), False),
    ("The reasoning is linear and shows nothing special.", set(), False),
    ("", set(), False),
])
def test_parse_judgement(text, behaviours, parsed):
    assert parse_judgement(text) == Judgement(frozenset(behaviours), parsed)


def test_behaviour_shares():
    js = [Judgement(frozenset({"verification"}), True), Judgement(frozenset({"verification", "enumeration"}), True),
          Judgement(frozenset(), True), Judgement(frozenset(), False)]
    shares = behaviour_shares(js)
    assert shares == pytest.approx({"backtracking": 0.0, "verification": 2 / 3, "subgoal setting": 0.0,
                                    "enumeration": 1 / 3, "none": 1 / 3, "unparsed": 0.25})
    assert set(BEHAVIOURS) < set(shares)


def _fake_eval_dir(root: Path) -> Path:
    for model, responses in (("base", ["a", "b", "c"]), ("rl", ["Wait, verify.", "Case 1. Case 2."])):
        path = root / "generations" / model / "toy.jsonl"
        path.parent.mkdir(parents=True)
        records = [{"index": 0, "problem": "q", "responses": responses, "num_tokens": [1] * len(responses),
                    "finished": [True] * len(responses)}]
        path.write_text("\n".join(json.dumps(x) for x in [{"format": "x", "settings": {}}, *records]) + "\n")
    return root


class CannedJudge:
    """A judge engine answering from the reasoning inside each prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prompts = []

    def generate(self, prompts, sampling):
        assert sampling.greedy and sampling.n == 1
        out = []
        for i, ids in enumerate(prompts):
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            reasoning = text.split("<start_of_reasoning>\n")[1].split("\n<end_of_reasoning>")[0]
            answer = {"Wait, verify.": '[{"behaviour": "Verification", "example": "verify"}]',
                      "Case 1. Case 2.": '```json\n[{"behavior": "enumeration", "example": "Case 1"}]\n```',
                      "c": "I cannot tell."}.get(reasoning, '[{"behaviour": "none", "example": ""}]')
            ids_out = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append(Rollout(i, ids_out, [0.0] * len(ids_out), True))
        return out

    def close(self):
        pass


def test_behaviours_run_on_eval_generations(model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    judge = CannedJudge(tokenizer)
    cfg = EvalConfig(n=1, temperature=0.0, max_new_tokens=64, template="plain", progress=False, batch_size=2)
    out = run_behaviours(ModelSpec("judge", str(model_dir)), _fake_eval_dir(tmp_path / "eval"), cfg,
                         tmp_path / "judged", open_fn=lambda *a, **k: judge)
    assert len(judge.prompts) == 5 and all(p.startswith("Below is a chain-of-reasoning") for p in judge.prompts)
    assert out.shares[("base", "toy")] == pytest.approx({"backtracking": 0, "verification": 0, "subgoal setting": 0,
                                                         "enumeration": 0, "none": 1.0, "unparsed": 1 / 3})
    assert out.shares[("rl", "toy")]["verification"] == 0.5 and out.shares[("rl", "toy")]["enumeration"] == 0.5
    saved = json.loads(Path(out.json_path).read_text())
    assert [j["behaviours"] for j in saved["judgements"]] == [[], [], [], ["verification"], ["enumeration"]]
    assert "| rl | toy | 2 | 0.0 | 50.0 | 0.0 | 50.0 | 0.0 | 0.0 |" in Path(out.markdown_path).read_text()
