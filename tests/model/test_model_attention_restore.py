"""response_logprobs / packed_attention leave a host trainer's model as they found it (generation still works) and
keep gradients exact under gradient checkpointing, where the backward recomputes the forward."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="model integration needs transformers (the train extra)")

from dsrl_fast.model.attention import TRANSFORMERS_ATTENTION_NAME
from dsrl_fast.model.packed import packed_attention, response_logprobs

VOCAB = 101
PREFIX = (3,)
PROMPTS = [[5, 9, 11], [7], [13, 2, 40, 41, 8]]
RESPONSES = [[17, 4, 66, 12], [30], [90, 91, 92]]


def host_model() -> torch.nn.Module:
    """A tiny Qwen3 with transformers' default attention, as a host trainer would hold it."""
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).float()


def reference_grads(model: torch.nn.Module, coefs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of Σ coef·logp over both spaces, each sequence run alone through the plain model (fp64 softmax)."""
    ref = copy.deepcopy(model).eval()
    total = torch.zeros((), dtype=torch.float64)
    for prompt, response, coef in zip(PROMPTS, RESPONSES, coefs):
        for context in (prompt, list(PREFIX)):
            logits = ref(input_ids=torch.tensor([context + response]), use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits[len(context) - 1:-1], dim=-1)
            total = total + (logp.gather(1, torch.tensor(response)[:, None]).squeeze(1) * coef).sum()
    total.backward()
    return {name: p.grad.clone() for name, p in ref.named_parameters()}


def objective(out: dict[str, list[torch.Tensor]], coefs: list[torch.Tensor]) -> torch.Tensor:
    return sum((lp.double() * c).sum() for space in ("cond", "marg") for lp, c in zip(out[space], coefs))


def assert_grads_match(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        scale = want[name].abs().max().clamp_min(1e-8)
        err = ((p.grad.double() - want[name]).abs().max() / scale).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_restores_attention_and_generation_still_works() -> None:
    model = host_model().eval()
    with torch.no_grad():
        out = response_logprobs(model, PROMPTS, RESPONSES, space="both", marginal_prefix=PREFIX, impl="torch")
    assert model.config._attn_implementation == "sdpa"
    assert [t.shape[0] for t in out["cond"]] == [len(r) for r in RESPONSES]
    generated = model.generate(torch.tensor([[5, 9, 11], [0, 13, 2]]), attention_mask=torch.tensor([[1, 1, 1],
                               [0, 1, 1]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 6)


def test_gradients_without_checkpointing_after_restore() -> None:
    model = host_model().train()
    coefs = [torch.randn(len(r), dtype=torch.float64) for r in RESPONSES]
    want = reference_grads(model, coefs)
    out = response_logprobs(model, PROMPTS, RESPONSES, space="both", marginal_prefix=PREFIX, impl="torch")
    assert model.config._attn_implementation == "sdpa"  # restored before the backward: nothing is recomputed
    objective(out, coefs).backward()
    assert_grads_match(model, want)


def test_gradient_checkpointing_backward_inside_block() -> None:
    model = host_model().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    coefs = [torch.randn(len(r), dtype=torch.float64) for r in RESPONSES]
    want = reference_grads(model, coefs)
    with pytest.raises(ValueError, match="packed_attention"):
        response_logprobs(model, PROMPTS, RESPONSES, impl="torch")
    assert model.config._attn_implementation == "sdpa"
    with packed_attention(model, attention_backend="torch"):
        assert model.config._attn_implementation == TRANSFORMERS_ATTENTION_NAME
        out = response_logprobs(model, PROMPTS, RESPONSES, space="both", marginal_prefix=PREFIX, impl="torch")
        objective(out, coefs).backward()
    assert model.config._attn_implementation == "sdpa"
    assert_grads_match(model, want)


def test_block_restores_on_error_and_nests() -> None:
    model = host_model()
    with pytest.raises(RuntimeError, match="boom"), packed_attention(model):
        with packed_attention(model):
            assert model.config._attn_implementation == TRANSFORMERS_ATTENTION_NAME
        assert model.config._attn_implementation == TRANSFORMERS_ATTENTION_NAME  # the inner block switched nothing
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
