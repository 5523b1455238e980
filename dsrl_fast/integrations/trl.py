"""TRL: a GRPOTrainer that runs dsrl_fast's loss (GRPO / NSR / PSR / dual clip / DSRL) on our fused log-probs.

One-line swap: ``GRPOTrainer(...)`` → ``DSRLGRPOTrainer(..., dsrl=DSRLOptions(switch_step=19))``, with TRL's
GRPOConfig defaults (bias-corrected KL included) and any tokenizer that has ``<|im_start|>`` or a BOS token.

- Log-probs: the model's forward is patched (like TRL's own fused LM head) so that ``fused_lm_head=True`` runs the
  backbone, keeps the hidden states of scored positions only and calls `dsrl_fast.linear_logprobs` (Triton on CUDA).
  Every TRL log-prob pass (policy, old, reference) goes through it. PEFT: the base model is patched, as TRL does;
  the reference model is patched inside whatever TRL wrapped it in. Tied embeddings: the head weight is
  `get_output_embeddings().weight`, whichever module owns it. ZeRO-3 / FSDP2: the head weight is looked up and
  gathered at call time, and under ZeRO-3 registered with the patched model for its backward (`gathered_head`), so a
  model that DeepSpeed partitions after the patch (one built by the user, partitioned by `deepspeed.initialize`)
  works.
- Loss: TRL's epsilon_low/high, beta (k3 KL, bias-corrected with ``use_bias_correction_kl``, TRL's default) and
  loss_type ("grpo", "bnpo", "dr_grpo", "dapo") become a `PolicyLossConfig` (no log-ratio clamp, like TRL); with
  `DSRLOptions(samples="all", denominator="peer")` the loss and gradients equal TRL's. vLLM importance-sampling
  ratios (token or sequence modes) weight the conditional policy term, as in TRL.
- DSRL: while ``state.global_step < switch_step`` the loss is NSR on the marginal log-probs of ``[prefix; y]``
  (positions from 0) times ``marginal_loss_scale``; from the switch step on, the conditional loss. The vLLM
  importance ratios are π_old(y|x)/π_vLLM(y|x), ratios of conditional probabilities: the marginal loss does not use
  them. TRL's advantages are used in both phases: the authors' marginal advantage r − mean needs
  ``scale_rewards="none"``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from contextlib import nullcontext
from typing import Any

import torch

from dsrl_fast.loss.config import SAMPLE_FILTERS, PolicyLossConfig
from dsrl_fast.integrations.common import (
    DENOMINATORS,
    check_prefix,
    marginal_batch,
    peer_policy_loss,
    phase_config,
    pip_extra,
    require,
)
from dsrl_fast.integrations.gathered_head import gathered_head_logprobs
from dsrl_fast.model.packed import lm_head_weight
from dsrl_fast.data.packing import default_marginal_prefix
from dsrl_fast.ops.validation import IMPLS

_trl = require("trl", pip_extra("trl"))
is_peft_model = require("accelerate.utils", pip_extra("trl")).is_peft_model
_trl_utils = require("trl.trainer.utils", pip_extra("trl"))

GRPOTrainer = _trl.GRPOTrainer
LOSS_TYPE_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                 "dapo": "token-mean"}

__all__ = ["DSRLGRPOTrainer", "DSRLOptions", "add_dsrl_lm_head", "loss_config_from_trl"]


@dataclasses.dataclass(frozen=True)
class DSRLOptions:
    """What dsrl_fast adds to TRL's GRPO options.

    Attributes:
        switch_step: optimizer steps (TRL's state.global_step, from 0) that run the marginal NSR-PreRL loss before
            the conditional loss; 0 = conditional from the start (plain GRPO / NSR / PSR). The authors' run: 19.
        marginal_prefix: token ids of the marginal context; None = the tokenizer's <|im_start|> (the authors' choice:
            151644 in Qwen tokenizers), else its BOS token.
        marginal_samples: sample filter of the marginal phase ("negative" = NSR).
        marginal_loss_scale: the marginal loss is multiplied by it (the authors' pretrain_loss_coef 0.01).
        samples: sample filter of the conditional phase ("all" = GRPO, "negative" = NSR, "positive" = PSR).
        clip_ratio_c: dual-clip constant (> 1) or None.
        denominator: "peer" divides by TRL's normalizer of the loss_type (equals TRL with samples="all");
            "kept" by the kept tokens/sequences of the micro-batch (the authors' NSR; then / gradient accumulation).
        impl: log-prob implementation, "auto" | "triton" | "torch".
    """

    switch_step: int = 0
    marginal_prefix: tuple[int, ...] | None = None
    marginal_samples: str = "negative"
    marginal_loss_scale: float = 0.01
    samples: str = "all"
    clip_ratio_c: float | None = None
    denominator: str = "peer"
    impl: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.switch_step, bool) or not isinstance(self.switch_step, int) or self.switch_step < 0:
            raise ValueError(f"switch_step must be an int >= 0, got {self.switch_step!r}")
        if self.marginal_prefix is not None:
            check_prefix("marginal_prefix", self.marginal_prefix)
        for name in ("marginal_samples", "samples"):
            if getattr(self, name) not in SAMPLE_FILTERS:
                raise ValueError(f"{name} must be one of {SAMPLE_FILTERS}, got {getattr(self, name)!r}")
        if self.denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {DENOMINATORS}, got {self.denominator!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")


def loss_config_from_trl(args: Any, options: DSRLOptions) -> PolicyLossConfig:
    """The conditional-phase PolicyLossConfig of a GRPOConfig `args` and `options`."""
    if args.loss_type not in LOSS_TYPE_AGG:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPE_AGG)} with DSRLGRPOTrainer, got "
                         f"{args.loss_type!r}")
    agg = LOSS_TYPE_AGG[args.loss_type]
    return PolicyLossConfig(
        clip_low=args.epsilon, clip_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        clip_ratio_c=options.clip_ratio_c, temperature=args.temperature, samples=options.samples, agg=agg,
        max_response_len=args.max_completion_length if agg == "seq-mean-token-sum-norm" else None,
        kl_coef=args.beta, kl_type="k3", kl_ratio_weighted=bool(getattr(args, "use_bias_correction_kl", False)),
        log_ratio_clamp=None)


def _unsupported_trl_options(args: Any) -> list[str]:
    checks = {
        "importance_sampling_level": (args.importance_sampling_level, "token"),
        "top_entropy_quantile": (args.top_entropy_quantile, 1.0),
        "off_policy_mask_threshold": (getattr(args, "off_policy_mask_threshold", None), None),
        "delta": (args.delta, None),
        "entropy_coef": (getattr(args, "entropy_coef", 0.0) or 0.0, 0.0),
    }
    return [f"{name}={value!r} (supported: {want!r})" for name, (value, want) in checks.items() if value != want]


def add_dsrl_lm_head(model: torch.nn.Module, *, temperature: float = 1.0, impl: str = "auto") -> None:
    """Patch `model.forward` so that ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's
    FusedCausalLMOutput with log_probs and entropy (B, L-1) fp32 from dsrl_fast's fused log-probs (zero where the
    shifted label is -100). Without ``fused_lm_head`` the original forward runs, so generation is unchanged.
    `model` is the bare causal LM (not a DeepSpeed/DDP wrapper); its head weight is looked up and, when sharded
    (ZeRO-3, FSDP2), gathered on each call, so it may be partitioned or wrapped after the patch.
    """
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: torch.nn.Module, *args: Any, fused_lm_head: bool = False, labels: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        if not fused_lm_head:
            return original_forward(*args, labels=labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        weight = lm_head_weight(self)
        autocast = torch.autocast(hidden.device.type, enabled=False) if torch.is_autocast_enabled(
            hidden.device.type) else nullcontext()
        with autocast:
            log_probs, entropy = gathered_head_logprobs(hidden, weight, targets, mask, module=self,
                                                        temperature=temperature, with_entropy=True, impl=impl)
        loss = -log_probs.sum() / mask.sum().clamp_min(1)
        return _trl_utils.FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask)

    model.forward = types.MethodType(forward, model)


class DSRLGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with dsrl_fast's loss and fused log-probs; `dsrl` adds DSRL / NSR / PSR / dual clip.

    Everything else (generation, vLLM, rewards, advantages, logging, PEFT, DeepSpeed) is TRL's. TRL options the
    loss does not implement (sequence-level IS, entropy masks/bonus, off-policy masks, two-sided delta clip) are
    rejected at construction with a ValueError naming them.
    """

    def __init__(self, *args: Any, dsrl: DSRLOptions | None = None, **kwargs: Any) -> None:
        dsrl = DSRLOptions() if dsrl is None else dsrl
        if not isinstance(dsrl, DSRLOptions):
            raise TypeError(f"dsrl must be a DSRLOptions, got {type(dsrl).__name__}")
        super().__init__(*args, **kwargs)
        bad = _unsupported_trl_options(self.args)
        if bad:
            raise ValueError(f"DSRLGRPOTrainer does not implement these GRPOConfig options: {', '.join(bad)}")
        self.dsrl = dsrl
        self.loss_config = loss_config_from_trl(self.args, dsrl)
        self.marginal_config = phase_config(self.loss_config, samples=dsrl.marginal_samples,
                                            loss_scale=dsrl.marginal_loss_scale)
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self.marginal_prefix = self._resolve_marginal_prefix(base) if dsrl.switch_step > 0 else None
        add_dsrl_lm_head(base, temperature=self.temperature, impl=dsrl.impl)
        if self.ref_model is not None:  # TRL has wrapped it already (DeepSpeed engine under ZeRO-3): patch the model
            add_dsrl_lm_head(self.accelerator.unwrap_model(self.ref_model), temperature=self.temperature,
                             impl=dsrl.impl)

    def _resolve_marginal_prefix(self, model: torch.nn.Module) -> tuple[int, ...]:
        """DSRLOptions.marginal_prefix, or the tokenizer's default; checked against the model's vocabulary."""
        prefix = self.dsrl.marginal_prefix
        if prefix is None:
            prefix = default_marginal_prefix(getattr(self.processing_class, "tokenizer", self.processing_class))
        vocab = model.get_input_embeddings().num_embeddings
        if max(prefix) >= vocab:
            raise ValueError(f"DSRLOptions.marginal_prefix must hold token ids below the model's vocabulary size "
                             f"{vocab} (pass the id of your tokenizer's context token), got {prefix}")
        return prefix

    def in_marginal_phase(self) -> bool:
        """True while the DSRL warmup (NSR-PreRL on the marginal space) runs."""
        return self.state.global_step < self.dsrl.switch_step

    def _marginal_logps(self, model: torch.nn.Module, inputs: dict[str, Any],
                        batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids, attention_mask, _ = marginal_batch(completion_ids, completion_mask, self.marginal_prefix)
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), batch_size=batch_size, compute_entropy=True)
        return logps, entropies

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if "old_per_token_logps" in output and self.in_marginal_phase():
            with torch.no_grad():
                output["old_marginal_logps"], _ = self._marginal_logps(
                    self.model, output, batch_size=self.args.per_device_train_batch_size)
        return output

    def _peer_count(self, inputs: dict[str, Any], mask: torch.Tensor, config: PolicyLossConfig) -> torch.Tensor:
        """TRL's normalizer of the loss_type (including gradient accumulation), as a count for peer_policy_loss."""
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1
        loss_type = self.args.loss_type
        if loss_type == "dapo":
            count = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            return count * accumulation / self.args.steps_per_generation if training else count
        if loss_type == "bnpo":
            return mask.sum().clamp(min=1.0).float() * accumulation
        return torch.tensor(float(mask.size(0) * accumulation), device=mask.device)

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        if self.aux_loss_enabled or "tool_mask" in inputs:
            raise ValueError("DSRLGRPOTrainer does not implement MoE aux losses or tool masks, got "
                             f"aux_loss_enabled={self.aux_loss_enabled}, tool_mask={'tool_mask' in inputs}")
        mask = inputs["completion_mask"].bool()
        advantages = inputs["advantages"]
        advantages = advantages[:, None] if advantages.dim() == 1 else advantages
        mode = "train" if self.model.training else "eval"
        weights = None
        if self.in_marginal_phase():
            logps, entropies = self._marginal_logps(model, inputs)
            old, ref, config = inputs.get("old_marginal_logps"), None, self.marginal_config
        else:
            if self.use_vllm and getattr(self, "vllm_importance_sampling_correction", False):
                # (B, T) in TRL's token modes, (B, 1) in its sequence modes
                weights = inputs["importance_sampling_ratio"].expand_as(mask)
            prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), completion_ids.size(1),
                compute_entropy=True)
            old, ref, config = inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps"), self.loss_config
        peer_count = self._peer_count(inputs, mask, config) if self.dsrl.denominator == "peer" else None
        loss, metrics = peer_policy_loss(logps, advantages.float(), mask, old_logprobs=old, config=config,
                                         weights=weights, ref_logprobs=ref, entropy=entropies,
                                         denominator=self.dsrl.denominator, peer_count=peer_count)
        if self.dsrl.denominator == "kept" and mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        gather = self.accelerator.gather
        self._metrics[mode]["dsrl/marginal_phase"].append(float(self.in_marginal_phase()))
        for name in ("clip_frac", "ratio_mean", "kl_mean", "kept_tokens", "entropy_mean"):
            if name in metrics:
                self._metrics[mode][f"dsrl/{name}"].append(gather(metrics[name].detach()).float().mean().item())
        return loss
