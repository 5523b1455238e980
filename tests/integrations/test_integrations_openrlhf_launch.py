"""The OpenRLHF launcher and Ray worker hook, run as a user runs them, in the OpenRLHF environment (make
test-openrlhf: openrlhf 0.11.2 with its own pins).

OpenRLHF's driver and model actors import two GPU-only packages at import time; CPU stand-ins replace them
(tests/stand_ins): flash_attn (no CPU build; the padding helpers, after flash_attn's contract) and, where vLLM is not
installed, vllm (OpenRLHF's pin is a CUDA build; the stand-in only provides the imported names).
Covered: the launcher's option errors (one line, exit 2, nothing started); the runtime-env hook that carries the
worker hook and options into the Ray job; in real Ray actors, the worker hook leaves `openrlhf.models` unimported in
a process that loads OpenRLHF's vLLM engine actor class and patches PolicyLoss / Actor.forward in one that loads its
PPO actor class; `python -m dsrl_fast.integrations.openrlhf.launch <OpenRLHF args>` end to end through OpenRLHF's own
parser, its `ray.init` (with our runtime env) and its PolicyModelActor process, which reports the swap and then stops
where a CPU machine stops OpenRLHF (DeepSpeed's CUDA device setup). Not covered (GPUs, vLLM): the actors' model
initialization and a PPO step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openrlhf", reason="runs in the OpenRLHF environment (make test-openrlhf)")
ray = pytest.importorskip("ray", reason="OpenRLHF's Ray launch needs ray (OpenRLHF's own dependency)")

from dsrl_fast.integrations.openrlhf import launch, worker  # noqa: E402
from dsrl_fast.data.toy import build_toy_tokenizer, make_addition_problems  # noqa: E402
from dsrl_fast.model.tiny import build_tiny_qwen3, save_tiny_model
from tests.paths import STAND_INS

STAND_INS = STAND_INS
DRIVER_TIMEOUT_S = 600
OPTIONS = {worker.ENV_SAMPLES: "negative", worker.ENV_DENOMINATOR: "kept", worker.ENV_LOSS_SCALE: "0.01",
           worker.ENV_FUSED: "1"}
SWAP_LINE = re.compile(r"dsrl_fast: OpenRLHF PolicyLoss -> DSRLPolicyLoss\(samples=negative, denominator=kept, "
                       r"loss_scale=0\.01\); Actor\.forward: fused log-probs \(pid (\d+)\)")


def stand_in_path() -> str:
    """PYTHONPATH entries of the stand-ins this environment needs (flash_attn, and vllm where it is missing)."""
    needed = [name for name in ("flash_attn", "vllm") if importlib.util.find_spec(name) is None]
    return os.pathsep.join(str(STAND_INS / name) for name in needed)


def test_runtime_env_hook_adds_the_worker_hook_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenRLHF's own runtime env (its env vars) is kept; the worker hook and the DSRL_FAST_* options are added."""
    for name, value in OPTIONS.items():
        monkeypatch.setenv(name, value)
    openrlhf_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN"}}
    merged = worker.runtime_env_hook(openrlhf_env)
    assert merged["worker_process_setup_hook"] == worker.SETUP_HOOK
    assert merged["env_vars"] == {**openrlhf_env["env_vars"], **OPTIONS}
    assert openrlhf_env == {"env_vars": {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN"}}  # not mutated
    assert worker.runtime_env_hook(None)["env_vars"] == OPTIONS
    with pytest.raises(ValueError, match="worker_process_setup_hook must be unset .*got 'my.hook'"):
        worker.runtime_env_hook({"worker_process_setup_hook": "my.hook"})
    monkeypatch.setenv(worker.ENV_FUSED, "yes")
    with pytest.raises(ValueError, match="DSRL_FAST_FUSED_LOGPROBS must be '0' or '1', got 'yes'"):
        worker.runtime_env_hook(None)


@pytest.mark.parametrize(("argv", "message"), [
    (["--dsrl.samples", "neg"], "argument --dsrl.samples: invalid choice: 'neg'"),
    (["--dsrl.loss_scale", "nan"], "loss_scale must be a finite number, got nan"),
    (["--dsrl.denominator", "all"], "argument --dsrl.denominator: invalid choice: 'all'"),
])
def test_launcher_option_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Before anything of OpenRLHF runs: one line on stderr, exit status 2, no variable set."""
    monkeypatch.delenv("RAY_RUNTIME_ENV_HOOK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        launch.main([*argv, "--actor.model_name_or_path", "unused"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert "RAY_RUNTIME_ENV_HOOK" not in os.environ


def test_launcher_refuses_another_runtime_env_hook(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_RUNTIME_ENV_HOOK", "my.module.hook")
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["--dsrl.samples", "negative"])
    assert exit_info.value.code == 2
    assert "RAY_RUNTIME_ENV_HOOK must be unset (the launcher sets it), got 'my.module.hook'" in capsys.readouterr().err


def test_worker_hook_in_ray_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local Ray job with the launcher's runtime env (2 CPUs): an actor that loads OpenRLHF's vLLM engine actor
    module (openrlhf.trainer.ray.vllm_engine) has the hook installed and no `openrlhf.models`; an actor that loads its
    PPO actor module (openrlhf.trainer.ray.ppo_actor) builds DSRLPolicyLoss where OpenRLHF builds PolicyLoss, with the
    job's options, and runs the fused Actor.forward; the hook has then left sys.meta_path."""
    for name, value in OPTIONS.items():
        monkeypatch.setenv(name, value)
    runtime_env = worker.runtime_env_hook({"env_vars": {"PYTHONPATH": stand_in_path()}})

    def vllm_side() -> dict[str, bool]:
        import sys

        import openrlhf.trainer.ray.vllm_engine as engine_module

        return {"engine_class": hasattr(engine_module, "RolloutRayActor"),
                "models_imported": "openrlhf.models" in sys.modules,
                "hook_waiting": any(type(f).__name__ == "_PatchAfterImport" for f in sys.meta_path)}

    def policy_side() -> dict[str, object]:
        import sys

        import openrlhf.trainer.ray.ppo_actor as actor_module
        from openrlhf.models.actor import Actor

        # the arguments ActorPPOTrainer passes (openrlhf/trainer/ray/ppo_actor.py)
        loss = actor_module.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=None, token_level_loss=True,
                                       policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
                                       is_correction_gating="ratio", is_correction_threshold=[0.5, 5.0])
        return {"loss": type(loss).__name__, "samples": loss.config.samples, "denominator": loss.denominator,
                "loss_scale": loss.config.loss_scale, "clip_high": loss.config.clip_high,
                "fused_forward": getattr(Actor.forward, "_dsrl_fast", False),
                "hook_waiting": any(type(f).__name__ == "_PatchAfterImport" for f in sys.meta_path)}

    @ray.remote(num_cpus=0)
    class Probe:
        def run(self, check):  # type: ignore[no-untyped-def]
            return check()

    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
    try:
        vllm_probe, policy_probe = Probe.remote(), Probe.remote()
        vllm_result, policy_result = ray.get([vllm_probe.run.remote(vllm_side), policy_probe.run.remote(policy_side)],
                                             timeout=DRIVER_TIMEOUT_S)
    finally:
        ray.shutdown()
    assert vllm_result == {"engine_class": True, "models_imported": False, "hook_waiting": True}
    assert policy_result == {"loss": "DSRLPolicyLoss", "samples": "negative", "denominator": "kept",
                             "loss_scale": 0.01, "clip_high": 0.28, "fused_forward": True, "hook_waiting": False}


def test_launcher_runs_openrlhfs_driver_into_its_policy_actor(tmp_path: Path) -> None:
    """`python -m dsrl_fast.integrations.openrlhf.launch --dsrl.* <OpenRLHF args>` as a user types it, on a local
    Ray whose node reports one GPU (RAY_OVERRIDE_RESOURCES; the machine has none): OpenRLHF's parser takes the
    arguments, its driver starts Ray with our runtime env and creates its actors; the PolicyModelActor process reports
    the swap with the options given, then fails in DeepSpeed's CUDA device setup, where OpenRLHF stops on a CPU
    machine. ~60 s (OpenRLHF's driver and two actor processes import torch, DeepSpeed and transformers)."""
    tokenizer = build_toy_tokenizer()
    model = build_tiny_qwen3(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model_dir = save_tiny_model(model, tokenizer, tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input": p.prompt_text}) + "\n" for p in make_addition_problems(8)))
    command = [sys.executable, "-m", "dsrl_fast.integrations.openrlhf.launch",
               "--dsrl.samples", "negative", "--dsrl.denominator", "kept", "--dsrl.loss_scale", "0.01",
               "--actor.model_name_or_path", str(model_dir), "--data.prompt_dataset", str(prompts),
               "--data.input_key", "input", "--reward.remote_url", "http://127.0.0.1:9/reward",
               "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2",
               "--rollout.batch_size", "2", "--train.batch_size", "4", "--algo.kl.init_coef", "0",
               "--vllm.num_engines", "0", "--actor.num_gpus_per_node", "1", "--rollout.max_new_tokens", "8",
               "--data.max_len", "64", "--ds.attn_implementation", "sdpa", "--ckpt.path", str(tmp_path / "ckpt")]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "DSRL_FAST_"))}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [stand_in_path(), env.get("PYTHONPATH")])),
               RAY_OVERRIDE_RESOURCES=json.dumps({"GPU": 1, "CPU": 4}), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S,
                          check=False)
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # Ray colours its log prefixes
    failure = re.search(r"RayTaskError\(\w+\): .*ray::PolicyModelActor\.init_model_from_pretrained\(\) "
                        r"\(pid=(\d+)", out)
    assert proc.returncode != 0 and failure is not None, out[-4000:]
    assert "_cuda_setDevice" in out or "CUDA" in out, out[-4000:]
    swapped = {int(pid) for pid in SWAP_LINE.findall(out)}
    assert int(failure.group(1)) in swapped, out[-4000:]
