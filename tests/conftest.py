"""Shared fixtures. Without CUDA, Triton kernels run under the interpreter (set before triton is imported)."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bf16 and compiled-kernel checks; the interpreter is wrong "
                                   "for bf16)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_SECONDS_PER_FILE: defaultdict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _SECONDS_PER_FILE[report.nodeid.split("::")[0]] += report.duration  # setup, call and teardown


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """With --durations=N, also the N slowest test files (0: all), each the sum of its tests' phases: where the
    suite's time goes, measured on every CI run. Under pytest-xdist the files' times add across the workers."""
    count = config.option.durations
    if count is None or not _SECONDS_PER_FILE:
        return
    ranked = sorted(_SECONDS_PER_FILE.items(), key=lambda item: -item[1])
    terminalreporter.write_sep("=", f"slowest {count or 'all'} test files (sum of setup, call and teardown)")
    for path, seconds in ranked[:count or None]:
        terminalreporter.write_line(f"{seconds:8.2f}s {path}")
    terminalreporter.write_line(f"{sum(_SECONDS_PER_FILE.values()):8.2f}s in all {len(ranked)} files")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module of many tiny ops: spinning OpenMP threads on busy shared cores cost ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_reward() -> Iterator[None]:
    """One math-verify reward for every in-process trainer run of a module: its workers start once (~10 s each
    time). Patches the trainer's reward factory while the module runs."""
    import dsrl_fast.train.run as run_mod
    from dsrl_fast.reward import MathVerifyReward

    reward = MathVerifyReward(num_workers=1)

    def get_reward_fn(name: str = "math_verify") -> object:
        assert name == "math_verify", name
        return reward.__call__  # no `close`: the trainer leaves it running for the next run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_mod, "get_reward_fn", get_reward_fn)
        yield
    reward.close()


@pytest.fixture(scope="module")
def shared_warmup() -> Iterator[None]:
    """The supervised warm-up computed once per module for each distinct input, its result replayed after that.

    A stand-in for the real call, exact by construction: the warm-up is a deterministic function of the model's
    initial weights, the problems, the tokenizer, the SFT settings, the seed, the target, the marginal share and the
    thread count (it draws from its own seeded generator, never the global RNG), so a repeated call gets the weights
    and the result the real one would compute, and its progress lines are printed again. Calls with an accuracy
    check (`measure`) always run for real (the check drives when it stops), as do calls whose stop is already
    requested. Saves ~3 s per in-process toy run after the first of a module."""
    import contextlib
    import functools
    import hashlib
    import io

    import dsrl_fast.train.warmup as warmup_mod

    real = warmup_mod.supervised_warmup
    done: dict[str, tuple[dict[str, torch.Tensor], Any, str]] = {}

    def key(model: torch.nn.Module, tokenizer: Any, problems: Any, sft: Any, seed: int, target: Any,
            marginal_share: float) -> str:
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(repr((list(problems), sft, seed, getattr(target, "__qualname__", repr(target)), marginal_share,
                            torch.get_num_threads())).encode())
        return digest.hexdigest()

    @functools.wraps(real)  # __wrapped__: the real warm-up
    def memoized(model: torch.nn.Module, tokenizer: Any, problems: Any, sft: Any, seed: int = 0, *,
                 measure: Callable[[], float] | None = None, should_stop: Callable[[], bool] | None = None,
                 target: Callable[[Any], str] | None = None, marginal_share: float = 0.0) -> Any:
        options = {} if target is None else {"target": target}
        if measure is not None or (should_stop is not None and should_stop()):
            return real(model, tokenizer, problems, sft, seed, measure=measure, should_stop=should_stop,
                        marginal_share=marginal_share, **options)
        k = key(model, tokenizer, problems, sft, seed, target, marginal_share)
        if k in done:
            weights, result, printed_text = done[k]
            with torch.no_grad():
                model.load_state_dict(weights)
            print(printed_text, end="")
            return result
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = real(model, tokenizer, problems, sft, seed, should_stop=should_stop,
                          marginal_share=marginal_share, **options)
        print(printed.getvalue(), end="")
        if should_stop is None or not should_stop():  # a warm-up stopped part-way is not the function of its inputs
            done[k] = ({n: t.detach().clone() for n, t in model.state_dict().items()}, result, printed.getvalue())
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warmup_mod, "supervised_warmup", memoized)
        yield
