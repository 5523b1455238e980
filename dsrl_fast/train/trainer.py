"""The DSRL training loop: rollouts → rewards → advantages → packed fused-loss updates → weight sync.

Runs as a plain process, under `torchrun` or under the `deepspeed` launcher (data parallel: each rank rolls out
its share of the step's prompts; every group of n rollouts stays on one rank). Each step draws its randomness from
(seed, step, rank), and the prompt sampler's position is checkpointed, so a resumed run repeats no step and loses
none.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsrl_fast.analysis.thoughts import count_thoughts
from dsrl_fast.data import Problem, PromptSampler, load_hf_problems, load_problems
from dsrl_fast.logprobs import linear_logprobs
from dsrl_fast.model import lm_head_weight, packed_hidden_states, prepare_packed_model
from dsrl_fast.reward import RewardFn, get_reward_fn
from dsrl_fast.rollout.base import RolloutEngine, SamplingConfig
from dsrl_fast.templates import render_prompt
from dsrl_fast.train.algorithms import Phase, phase_for_step
from dsrl_fast.train.checkpoint import latest_checkpoint, load_checkpoint, load_reference, save_checkpoint
from dsrl_fast.train.config import TrainConfig, config_to_dict, save_config
from dsrl_fast.train.metrics_log import MetricsLogger, StepProgress, print0
from dsrl_fast.train.plot import plot_metrics
from dsrl_fast.train.rl_step import collect_samples, run_update, sample_advantages
from dsrl_fast.train.update import (
    DeepSpeedUpdater,
    PolicyModule,
    TorchUpdater,
    Updater,
    deepspeed_config,
    lr_factor,
)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    device: torch.device


@dataclass
class TrainSummary:
    """What a finished run reports."""

    accuracy_before: float
    accuracy_after: float
    steps: int
    seconds: float
    output_dir: str
    plot_path: str | None
    checkpoint_path: str


def init_distributed() -> Dist:
    """Join the process group when launched with WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, device)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_model_and_tokenizer(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The embedded toy model/tokenizer (model.name_or_path None) or a pretrained Hugging Face causal LM."""
    if cfg.model.name_or_path is None:
        from dsrl_fast.toy import build_tiny_qwen3, build_toy_tokenizer

        tokenizer = build_toy_tokenizer()
        model = build_tiny_qwen3(len(tokenizer), seed=cfg.seed, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path,
                                                  trust_remote_code=cfg.model.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=_dtype(cfg.model.dtype, device),
                                                     trust_remote_code=cfg.model.trust_remote_code)
    model = model.to(device=device, dtype=_dtype(cfg.model.dtype, device))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def load_train_eval_problems(cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems: generated toy additions, or the configured files / datasets."""
    d = cfg.data
    if d.train_path is None:
        from dsrl_fast.toy import make_addition_problems

        # One draw of distinct pairs, sliced, so held-out problems never appear in training.
        drawn = make_addition_problems(d.toy_train_size + d.eval_size, seed=cfg.seed, low=d.toy_low, high=d.toy_high)
        return drawn[: d.toy_train_size], drawn[d.toy_train_size:]

    def load(path: str, limit: int | None, problem_key: str, answer_key: str, mode: str) -> list[Problem]:
        if path.startswith("hf:"):
            name, _, split = path[3:].partition(":")
            return load_hf_problems(name, split or "train", problem_key=problem_key, answer_key=answer_key,
                                    answer_mode=mode, limit=limit)
        return load_problems(path, problem_key, answer_key, answer_mode=mode, limit=limit)

    train = load(d.train_path, None, d.problem_key, d.answer_key, d.answer_mode)
    held_out = []
    if d.eval_path:
        held_out = load(d.eval_path, d.eval_size, d.eval_problem_key or d.problem_key,
                        d.eval_answer_key or d.answer_key, d.eval_answer_mode or d.answer_mode)
    return train, held_out


def encode_problems(cfg: TrainConfig, tokenizer: Any, problems: list[Problem]) -> list[list[int]]:
    """Prompt token ids, truncated from the left to data.max_prompt_len."""
    template = "plain" if cfg.data.train_path is None else cfg.data.template
    texts = [render_prompt(p.prompt_text, template, tokenizer) for p in problems]
    special = cfg.data.train_path is None  # the toy prompts start with <bos>
    return [tokenizer(t, add_special_tokens=special)["input_ids"][-cfg.data.max_prompt_len:] for t in texts]


def resolve_marginal_prefix(cfg: TrainConfig, tokenizer: Any) -> tuple[int, ...]:
    """algo.marginal_prefix, else the tokenizer's <|im_start|> id (the authors' choice), else its BOS id."""
    if cfg.algo.marginal_prefix is not None:
        return tuple(cfg.algo.marginal_prefix)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if isinstance(im_start, int) and im_start != tokenizer.unk_token_id and im_start is not None:
        return (im_start,)
    if tokenizer.bos_token_id is None:
        raise ValueError("algo.marginal_prefix must be set: the tokenizer has neither <|im_start|> nor a BOS token")
    return (tokenizer.bos_token_id,)


@contextlib.contextmanager
def generation_attention(model: torch.nn.Module) -> Iterator[None]:
    """Generate with SDPA (padded batches, KV cache), then return to the packed attention used for training."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class _SharedModelEngine:
    """Runs an HF engine over the training model itself with the generation attention switched in."""

    def __init__(self, engine: RolloutEngine, model: torch.nn.Module):
        self.engine, self.model = engine, model

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Any]:
        with generation_attention(self.model):
            return self.engine.generate(prompts, sampling)

    def update_weights(self, named_tensors: Any) -> None:
        """The engine shares the trainer's parameters: nothing to copy."""

    def close(self) -> None:
        self.engine.close()


def build_engine(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any) -> RolloutEngine:
    """The rollout engine of rollout.engine: the HF engine on the shared model, or a colocated vLLM."""
    if cfg.rollout.engine == "hf":
        from dsrl_fast.rollout.hf_engine import HFEngine

        return _SharedModelEngine(HFEngine(model), model)
    from dsrl_fast.rollout.vllm_engine import VLLMEngine

    export = Path(cfg.output_dir) / "vllm_init"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    # vLLM refuses a max_model_len beyond the model's positions (the toy model has 64).
    longest = cfg.data.max_prompt_len + cfg.rollout.max_response_len
    positions = getattr(model.config, "max_position_embeddings", None)
    # The trainer's dtype, not vLLM's "auto" (which runs an fp32 model in bf16 on CPU): sampler and trainer
    # log-probs must agree.
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return VLLMEngine(str(export), dtype=dtype, seed=cfg.seed,
                      gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                      cpu_kv_cache_gib=math.ceil(cfg.rollout.vllm_kv_cache_gib),
                      max_model_len=min(longest, positions) if positions else longest)


def build_updater(cfg: TrainConfig, module: PolicyModule, world_size: int) -> Updater:
    """DeepSpeed when deepspeed.enabled (None: when distributed), else single-process AdamW."""
    o, ds = cfg.optim, cfg.deepspeed
    use_ds = ds.enabled if ds.enabled is not None else world_size > 1
    if not use_ds:
        if world_size > 1:
            raise ValueError(f"deepspeed.enabled must not be false with WORLD_SIZE={world_size}: "
                             "data parallel training runs through DeepSpeed")
        return TorchUpdater(module, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                            grad_clip=o.grad_clip)
    bf16 = ds.bf16 if ds.bf16 is not None else torch.cuda.is_available()
    config = deepspeed_config(zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer,
                              offload_params=ds.offload_params, bf16=bf16, lr=o.lr, weight_decay=o.weight_decay,
                              betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip)
    return DeepSpeedUpdater(module, config)


def _phase(cfg: TrainConfig, step: int) -> Phase:
    a = cfg.algo
    return phase_for_step(step, algo=a.algo, switch_step=a.switch_step, lr=cfg.optim.lr,
                          marginal_lr=cfg.optim.marginal_lr, clip_low=a.clip_low, clip_high=a.clip_high,
                          clip_ratio_c=a.clip_ratio_c, agg=a.agg, pretrain_loss_coef=a.pretrain_loss_coef,
                          marginal_advantage=a.marginal_advantage, kl_coef=a.kl_coef, kl_type=a.kl_type,
                          entropy_coef=a.entropy_coef, temperature=cfg.rollout.temperature,
                          max_response_len=cfg.rollout.max_response_len)


def _sampling(cfg: TrainConfig, tokenizer: Any, n: int, seed: int, greedy: bool = False) -> SamplingConfig:
    return SamplingConfig(temperature=0.0 if greedy else cfg.rollout.temperature, top_p=cfg.rollout.top_p, n=n,
                          max_new_tokens=cfg.rollout.max_response_len,
                          stop_token_ids=(tokenizer.eos_token_id,), seed=seed)


def evaluate(cfg: TrainConfig, engine: RolloutEngine, tokenizer: Any, reward_fn: RewardFn,
             problems: list[Problem], prompts: list[list[int]], d: Dist, *, greedy: bool) -> float:
    """Accuracy of one response per held-out problem (sampled at the rollout temperature, or greedy)."""
    if not problems:
        return float("nan")
    mine = list(range(d.rank, len(problems), d.world_size))
    rollouts = engine.generate([prompts[i] for i in mine], _sampling(cfg, tokenizer, 1, cfg.seed + 17, greedy))
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    scores = reward_fn(texts, [problems[mine[r.prompt_index]].answer for r in rollouts])
    total, count = _sum_over_ranks([sum(scores), len(scores)])
    return total / max(count, 1)


def _sum_over_ranks(values: list[float]) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 101 + rank) % (2**31 - 1)


def train(cfg: TrainConfig) -> TrainSummary:
    """Run `cfg` end to end and return the before/after accuracy, wall time and where the outputs are."""
    started = time.perf_counter()
    d = init_distributed()
    out = Path(cfg.output_dir)
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model_and_tokenizer(cfg, d.device)
    problems, held_out = load_train_eval_problems(cfg)
    prompts = encode_problems(cfg, tokenizer, problems)
    eval_prompts = encode_problems(cfg, tokenizer, held_out)
    prefix = resolve_marginal_prefix(cfg, tokenizer)
    if cfg.prompts_per_step % d.world_size:
        raise ValueError(f"prompts_per_step must be a multiple of the world size {d.world_size}, "
                         f"got {cfg.prompts_per_step}")

    if cfg.rollout.engine == "vllm" and d.world_size > 1:
        raise ValueError(f"rollout.engine='vllm' runs one colocated engine per process; with WORLD_SIZE="
                         f"{d.world_size} use rollout.engine='hf' (vLLM's external launcher is not wired in yet)")
    resume_from = latest_checkpoint(out) if cfg.resume else None
    reward_fn = get_reward_fn("math_verify")
    engine = build_engine(cfg, model, tokenizer)
    try:
        trainer_state: dict[str, Any] = {}
        if resume_from is None and cfg.sft.steps > 0:
            from dsrl_fast.toy import supervised_warmup

            if cfg.model.name_or_path is not None:
                raise ValueError("sft.steps > 0 is the toy task's warm-up; set sft.steps=0 for a pretrained model")
            losses = supervised_warmup(model, tokenizer, problems, cfg.sft.steps, batch_size=cfg.sft.batch_size,
                                       lr=cfg.sft.lr, seed=cfg.seed)
            print0(f"supervised warm-up: {cfg.sft.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
            engine.update_weights(model.state_dict().items())

        prepare_packed_model(model, attention_backend=cfg.model.attention_backend, use_liger=cfg.model.use_liger)
        module = PolicyModule(model)
        # The reference is copied before the updater exists: under ZeRO-3 the model's tensors are partitioned after.
        ref_model = _frozen_copy(model) if cfg.algo.kl_coef > 0 else None
        updater = build_updater(cfg, module, d.world_size)
        sampler = PromptSampler(len(problems), cfg.prompts_per_step, seed=cfg.seed)
        start_step = 0
        if resume_from is not None:
            trainer_state = load_checkpoint(resume_from, updater)
            sampler.load_state_dict(trainer_state["sampler"])
            start_step = trainer_state["step"]
            engine.update_weights(updater.named_parameters_for_sync())
            print0(f"resumed from {resume_from} at step {start_step}")
        else:
            trainer_state["accuracy_before"] = evaluate(cfg, engine, tokenizer, reward_fn, held_out, eval_prompts, d,
                                                        greedy=cfg.eval_greedy)
            print0(f"held-out accuracy before RL: {trainer_state['accuracy_before']:.3f}")

        if ref_model is not None and resume_from is not None:
            load_reference(resume_from, ref_model)
        logger = MetricsLogger(out, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                               config_dict=config_to_dict(cfg), resume=resume_from is not None)
        if resume_from is not None:
            logger.truncate_after(start_step)
        progress = StepProgress(cfg.steps, start_step, enabled=cfg.progress)
        per_rank = cfg.prompts_per_step // d.world_size
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            torch.manual_seed(_step_seed(cfg.seed, step, d.rank))
            phase = _phase(cfg, step)
            if cfg.algo.algo == "dsrl" and step == cfg.algo.switch_step and ref_model is not None:
                # Full (gathered under ZeRO-3) actor weights; a tied LM head arrives through its embedding.
                ref_model.load_state_dict(dict(updater.named_parameters_for_sync()), strict=False)
            batch = sampler.next_batch()
            mine = batch[d.rank * per_rank:(d.rank + 1) * per_rank]
            my_prompts = [prompts[i] for i in mine]
            rollouts = engine.generate(my_prompts, _sampling(cfg, tokenizer, cfg.rollout.n,
                                                              _step_seed(cfg.seed, step, d.rank)))
            texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
            rewards = reward_fn(texts, [problems[mine[r.prompt_index]].answer for r in rollouts])
            samples = collect_samples(my_prompts, rollouts, rewards, group_offset=d.rank * per_rank)
            advantages = sample_advantages(samples, phase.estimator)
            lr = phase.lr * _lr_factor(cfg, step)
            result = run_update(updater, samples, advantages, phase, marginal_prefix=prefix,
                                max_tokens=cfg.optim.max_tokens_per_micro_batch, device=d.device, lr=lr,
                                ref_logprobs_fn=_ref_fn(ref_model, phase) if ref_model is not None else None)
            if result.stepped:
                engine.update_weights(updater.named_parameters_for_sync())
            metrics = _step_metrics(cfg, phase, samples, texts, result, lr, time.perf_counter() - t0,
                                     trainer_state)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                logger.log(step, {k: v for k, v in metrics.items() if v is not None})
            progress.update(step + 1, metrics["reward_mean"], metrics["tokens_per_s"])
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_checkpoint(out, done, updater, tokenizer, dict(trainer_state, sampler=sampler.state_dict()),
                                cfg.keep_checkpoints, reference=ref_model)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                acc = evaluate(cfg, engine, tokenizer, reward_fn, held_out, eval_prompts, d, greedy=cfg.eval_greedy)
                logger.log(step, {"step": step, "eval_accuracy": acc})
        progress.close()

        accuracy_after = evaluate(cfg, engine, tokenizer, reward_fn, held_out, eval_prompts, d, greedy=cfg.eval_greedy)
        final = save_checkpoint(out, cfg.steps, updater, tokenizer, dict(trainer_state, sampler=sampler.state_dict()),
                                cfg.keep_checkpoints, reference=ref_model)
        logger.close()
        plot_path = None
        if d.rank == 0 and (out / "metrics.jsonl").is_file():
            switch = cfg.algo.switch_step if cfg.algo.algo == "dsrl" else None
            plot_path = plot_metrics(out / "metrics.jsonl", out / "training.png", switch_step=switch)
        return TrainSummary(trainer_state["accuracy_before"], accuracy_after, cfg.steps, time.perf_counter() - started,
                            str(out), plot_path, str(final / "hf"))
    finally:
        engine.close()
        close = getattr(reward_fn, "close", None)
        if close is not None:
            close()


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    o = cfg.optim
    return lr_factor(step, cfg.steps, o.schedule, o.warmup_steps, o.min_lr_ratio)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _ref_fn(ref_model: torch.nn.Module, phase: Phase) -> Any:
    def ref_logprobs(batch: Any) -> torch.Tensor:
        with torch.no_grad():
            hidden = packed_hidden_states(ref_model, batch)
            labels = batch.labels.index_select(0, batch.masked_idx)
            return linear_logprobs(hidden, lm_head_weight(ref_model), labels,
                                   temperature=phase.loss.temperature).logprobs

    return ref_logprobs


def _step_metrics(cfg: TrainConfig, phase: Phase, samples: Any, texts: list[str], result: Any, lr: float,
                  seconds: float, totals: dict[str, Any]) -> dict[str, Any]:
    """The metrics.jsonl row of one step (global over ranks); adds the step's fully solved / unsolved prompt groups
    to the running counts in `totals` (the checkpointed trainer state)."""
    n = cfg.rollout.n
    rewards = samples.rewards.view(-1, n)
    thoughts = count_thoughts(texts)
    lengths = [len(r) for r in samples.response_ids]
    prompt_tokens = sum(len(p) for p in samples.prompt_ids)
    sums = _sum_over_ranks([
        float(rewards.sum()), float((rewards == 1).float().sum()), float(rewards.numel()), float(sum(lengths)),
        float((rewards == 1).all(dim=1).sum()), float((rewards < 1).all(dim=1).sum()), float(rewards.shape[0]),
        float(thoughts.transition), float(thoughts.reflection), float(thoughts.steps),
        float(prompt_tokens + sum(lengths)),
    ])
    total, correct, count, length, solved, unsolved, groups, transition, reflection, steps, tokens = sums
    for key, value in (("fully_solved_total", solved), ("fully_unsolved_total", unsolved)):
        totals[key] = totals.get(key, 0) + round(value)
    return {
        "space": phase.space,
        "samples": phase.samples,
        "algo": phase.algo,
        "reward_mean": total / count,
        "accuracy": correct / count,
        "response_len_mean": length / count,
        "loss": result.loss,
        "clip_frac": result.clip_frac,
        "entropy": result.entropy,
        "grad_norm": result.grad_norm,
        "tokens_per_s": tokens / seconds,
        "logprob_drift": result.logprob_drift,
        "fully_solved": solved / groups,
        "fully_unsolved": unsolved / groups,
        "fully_solved_total": totals["fully_solved_total"],
        "fully_unsolved_total": totals["fully_unsolved_total"],
        "transition_share": transition / max(steps, 1.0),
        "reflection_share": reflection / max(steps, 1.0),
        "execution_share": (steps - transition - reflection) / max(steps, 1.0),
        "trained_tokens": result.trained_tokens,
        "lr": lr,
        "step_seconds": seconds,
    }
