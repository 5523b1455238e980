"""Packed dual-space forwards of tiny random HF models equal running every sequence alone through the plain model."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="model integration needs transformers (the train extra)")

from dsrl_fast.model.packed import lm_head_weight, packed_hidden_states, prepare_packed_model, response_logprobs  # noqa: E402
from dsrl_fast.data.packing import pack  # noqa: E402

VOCAB = 211
PREFIX = (7,)


def tiny_model(family: str) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=32, tie_word_embeddings=True, **common)
        cls = transformers.Qwen3ForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(tie_word_embeddings=False, **common)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.LlamaConfig(head_dim=32, **common)
        cls = transformers.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(cfg).float().eval()


def random_samples(n: int, max_prompt: int = 9, max_response: int = 8) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [torch.randint(0, VOCAB, (int(torch.randint(1, max_prompt + 1, ())),)).tolist() for _ in range(n)]
    responses = [torch.randint(0, VOCAB, (int(torch.randint(1, max_response + 1, ())),)).tolist() for _ in range(n)]
    responses[0] = responses[0][:1]  # a 1-token response
    return prompts, responses


def alone_logprobs(model: torch.nn.Module, context: list[int], response: list[int]) -> torch.Tensor:
    """Log-probs of `response` after `context`, from the unmodified model with materialized logits."""
    ids = torch.tensor([context + response])
    logits = model(input_ids=ids, use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits[len(context) - 1: -1], dim=-1)
    return logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_packed_equals_alone(family: str) -> None:
    plain = tiny_model(family)
    packed_model = prepare_packed_model(copy.deepcopy(plain), attention_backend="torch")
    prompts, responses = random_samples(5)
    with torch.no_grad():
        got = response_logprobs(packed_model, prompts, responses, space="both", marginal_prefix=PREFIX,
                                impl="torch")
        worst = 0.0
        for i, (p, r) in enumerate(zip(prompts, responses)):
            for space, context in (("cond", p), ("marg", list(PREFIX))):
                want = alone_logprobs(plain, context, r)
                assert got[space][i].shape == (len(r),)
                worst = max(worst, (got[space][i].double() - want).abs().max().item())
    assert worst < 1e-5, f"max |packed - alone| = {worst:.2e}"


def test_gradients_equal_alone() -> None:
    plain = tiny_model("qwen3")
    packed_model = prepare_packed_model(copy.deepcopy(plain), attention_backend="torch")
    prompts, responses = random_samples(3)
    weights = [torch.randn(len(r), dtype=torch.float64) for r in responses]
    got = response_logprobs(packed_model, prompts, responses, space="both", marginal_prefix=PREFIX, impl="torch")
    (sum((g.double() * w).sum() for g, w in zip(got["cond"] + got["marg"], weights + weights))).backward()
    want = sum((alone_logprobs(plain, ctx, r) * w).sum() for p, r, w in zip(prompts, responses, weights)
               for ctx in (p, list(PREFIX)))
    want.backward()
    worst = 0.0
    for (name, a), b in zip(packed_model.named_parameters(), plain.parameters()):
        scale = b.grad.abs().max().clamp_min(1e-8)
        worst = max(worst, ((a.grad - b.grad).abs().max() / scale).item())
    assert worst < 1e-4, f"max relative gradient error {worst:.2e}"


def test_marginal_ignores_prompt_and_batch_company() -> None:
    model = prepare_packed_model(tiny_model("qwen3"), attention_backend="torch")
    prompts, responses = random_samples(6)
    other_prompts = [list(reversed(p)) + [3] for p in prompts]
    with torch.no_grad():
        a = response_logprobs(model, prompts, responses, space="marg", marginal_prefix=PREFIX, impl="torch")
        b = response_logprobs(model, other_prompts, responses, space="marg", marginal_prefix=PREFIX, impl="torch")
        alone = [response_logprobs(model, [p], [r], space="both", marginal_prefix=PREFIX, impl="torch")
                 for p, r in zip(prompts, responses)]
        small_budget = response_logprobs(model, prompts, responses, space="both", marginal_prefix=PREFIX,
                                         max_tokens_per_batch=24, impl="torch")
    assert set(a) == {"marg"}
    for i in range(len(responses)):
        torch.testing.assert_close(a["marg"][i], b["marg"][i], rtol=0, atol=1e-6)
        for space in ("cond", "marg"):
            torch.testing.assert_close(small_budget[space][i], alone[i][space][0], rtol=0, atol=1e-5)


def test_hidden_states_only_at_masked_rows_and_entropy() -> None:
    model = prepare_packed_model(tiny_model("qwen3"), attention_backend="torch")
    prompts, responses = random_samples(3)
    batch = pack(prompts, responses, "both", PREFIX)
    with torch.no_grad():
        hidden = packed_hidden_states(model, batch)
        out = response_logprobs(model, prompts, responses, space="cond", with_entropy=True, impl="torch")
    assert hidden.shape == (batch.num_masked, model.config.hidden_size)
    assert lm_head_weight(model).shape == (VOCAB, 64)
    assert set(out) == {"cond", "cond_entropy"}
    assert all((e > 0).all() and e.shape == lp.shape for e, lp in zip(out["cond_entropy"], out["cond"]))


def test_gradient_checkpointing_gives_same_gradients() -> None:
    base = prepare_packed_model(tiny_model("qwen3"), attention_backend="torch")
    ckpt = copy.deepcopy(base)
    ckpt.gradient_checkpointing_enable()
    ckpt.train()
    base.train()
    prompts, responses = random_samples(3)
    for m in (base, ckpt):
        out = response_logprobs(m, prompts, responses, space="both", marginal_prefix=PREFIX, impl="torch")
        sum(t.sum() for t in out["cond"] + out["marg"]).backward()
    for a, b in zip(base.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_bad_space_and_lengths() -> None:
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match=r"space must be one of \('cond', 'marg', 'both'\), got 'x'"):
        response_logprobs(model, [[1]], [[2]], space="x")
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        response_logprobs(model, [[1], [2]], [[2]])


def test_a_zero3_partitioned_head_with_grad_enabled_is_refused() -> None:
    # The gathered weight would be partitioned again before the backward (seen as a ZeroDivisionError deep in the
    # chunked backward); DeepSpeed marks a ZeRO-3 parameter with `ds_id`, which is all this check reads.
    model = tiny_model("qwen3")
    lm_head_weight(model).ds_id = 0
    with pytest.raises(ValueError, match="under DeepSpeed ZeRO-3 must run under torch.no_grad"):
        response_logprobs(model, [[1]], [[2]])
