"""`python -m dsrl_fast.integrations.verl_launch`, as a verl user types it, in verl's real process layout on CPU.

Runs in .venv-verl (`make test-verl`; it skips in .venv). The launch test starts the real driver (verl's Hydra
`main_ppo`, its config validation and `ray.init` with verl's runtime_env), a real local Ray cluster, verl's
`TaskRunnerV1` actor with its TransferQueue service, and in it the "dsrl" trainer, which must have been registered
there by the plugin that the launcher forwarded; verl then loads the tiny model's tokenizer and the parquet data and
stops where it places its workers on GPUs ("Total available GPUs 0 ..."), a check verl makes before any worker
starts. Not run here: verl's FSDP workers (GPUs), the rollout server (vLLM/SGLang on GPUs) and so a training step;
that the workers import the plugin rests on the same VERL_USE_EXTERNAL_MODULES in the same runtime_env, which Ray
passes to every actor of the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl 0.9.1 pins transformers <5.11 and trl 0.27, so its tests run in .venv-verl "
                    "(make test-verl; pip install 'dsrl_fast[verl]')")

from dsrl_fast.integrations import verl_launch  # noqa: E402
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT


def test_launch_arguments_forward_the_plugin_once() -> None:
    key = verl_launch.RUNTIME_ENV_KEY
    value, overrides = verl_launch.launch_arguments(["trainer.v1.trainer_mode=dsrl"], None)
    assert value == verl_launch.PLUGIN
    assert overrides == ["trainer.v1.trainer_mode=dsrl", f"++{key}='{verl_launch.PLUGIN}'"]
    value, overrides = verl_launch.launch_arguments(
        ["a=1", f"+{key}=my.ext", "b=2"], f"other.mod,{verl_launch.PLUGIN}")
    assert value == f"other.mod,{verl_launch.PLUGIN},my.ext"
    assert overrides == ["a=1", "b=2", f"++{key}='{value}'"]


def _tiny_run_files(directory: Path) -> None:
    """A tiny Qwen3 with the toy tokenizer (and a chat template) and a 4-prompt parquet data set, as verl reads them."""
    import pandas as pd

    from dsrl_fast.data.toy import build_toy_tokenizer
    from dsrl_fast.model.tiny import build_tiny_qwen3, save_tiny_model

    tokenizer = build_toy_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = build_tiny_qwen3(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_tiny_model(model, tokenizer, directory / "model")
    rows = [{"data_source": "toy", "prompt": [{"role": "user", "content": f"Compute {a}+{b}."}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(a + b)}, "extra_info": {"index": i}}
            for i, (a, b) in enumerate([(12, 34), (56, 78), (23, 45), (67, 89)])]
    pd.DataFrame(rows).to_parquet(directory / "train.parquet")


def test_launch_runs_the_dsrl_trainer_in_verls_task_runner(tmp_path: Path) -> None:
    _tiny_run_files(tmp_path)
    overrides = [
        "trainer.v1.trainer_mode=dsrl", "+dsrl.switch_step=2", "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.actor.policy_loss.loss_mode=dsrl",
        f"actor_rollout_ref.model.path={tmp_path / 'model'}", f"data.train_files={tmp_path / 'train.parquet'}",
        f"data.val_files={tmp_path / 'train.parquet'}", "data.train_batch_size=2", "data.max_prompt_length=16",
        "data.max_response_length=8", "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2", "trainer.n_gpus_per_node=1", "trainer.nnodes=1",
        "trainer.logger=[console]", "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        # logical CPUs for the task runner and the TransferQueue actors; no dashboard on a 2-core machine
        "ray_kwargs.ray_init.num_cpus=8", "+ray_kwargs.ray_init.include_dashboard=false",
    ]
    env = {k: v for k, v in os.environ.items() if k != verl_launch.ENV}
    proc = subprocess.Popen([sys.executable, "-m", "dsrl_fast.integrations.verl_launch", *overrides], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=420)
    finally:  # the driver's Ray cluster and its actors share its process group
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    tail = out[-4000:]
    assert f"'{verl_launch.ENV}': '{verl_launch.PLUGIN}'" in out, tail  # verl's printed ray.init runtime_env
    assert "Unknown trainer" not in out, tail
    runner_lines = [line for line in out.splitlines() if "(TaskRunnerV1 pid=" in line and "dsrl: verl trainer" in line]
    assert runner_lines and "mode 'sync' (ReplayBuffer)" in runner_lines[0], tail
    assert "then loss_mode 'dsrl'" in runner_lines[0], tail
    assert "Total available GPUs 0 is less than total desired GPUs 1" in out, tail
    assert proc.returncode != 0


def test_launch_without_verl_is_one_line_and_status_2() -> None:
    code = ("import sys; sys.modules['verl'] = None\n"
            "from dsrl_fast.integrations.verl_launch import main\nmain(['trainer.v1.trainer_mode=dsrl'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'dsrl_fast[verl]'" in lines[0], done.stderr
