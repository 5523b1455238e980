"""DSRL inside TRL: a few GRPOTrainer steps on the embedded toy task (tiny Qwen3, nothing downloaded).

The swap: GRPOTrainer(...) -> DSRLGRPOTrainer(..., dsrl=DSRLOptions(switch_step=...)).
Run: python examples/trl_dsrl.py --steps 4 --switch-step 2 --output-dir /tmp/trl_dsrl
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from trl import GRPOConfig

from dsrl_fast.integrations.trl import DSRLGRPOTrainer, DSRLOptions
from dsrl_fast.data.toy import build_toy_tokenizer, make_addition_problems
from dsrl_fast.model.tiny import build_tiny_qwen3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--switch-step", type=int, default=2, help="NSR-PreRL steps before GRPO")
    parser.add_argument("--output-dir", default="/tmp/trl_dsrl")
    args = parser.parse_args()

    tokenizer = build_toy_tokenizer()
    model = build_tiny_qwen3(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    problems = make_addition_problems(64)
    dataset = Dataset.from_list([{"prompt": p.prompt_text, "answer": p.answer} for p in problems])

    def reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
        return [float(f"\\boxed{{{a}}}" in c) for c, a in zip(completions, answer)]

    config = GRPOConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=12, learning_rate=1e-4, beta=0.0,
                        loss_type="dapo", scale_rewards="none", logging_steps=1, report_to="none",
                        use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = DSRLGRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
        dsrl=DSRLOptions(switch_step=args.switch_step),  # the marginal context: the tokenizer's <|im_start|>
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "dsrl/marginal_phase" in entry:
            print(f"step {entry['step']}: marginal={entry['dsrl/marginal_phase']:.0f} "
                  f"kept_tokens={entry['dsrl/kept_tokens']:.0f} reward={entry['reward']:.3f}")


if __name__ == "__main__":
    main()
