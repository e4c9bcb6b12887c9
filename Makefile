# The two commands of the quick start: `make run` and `make test`.
# CPU machines get the CPU build of torch (TORCH_SPEC) and never CUDA packages. GPU users:
# create .venv and install your own CUDA torch into it first; `make` keeps whatever torch it finds.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmdiff-installed

.PHONY: run test venv bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,peers,data]"
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/mmdiff run

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/capture.py
	$(BIN)/python benchmarks/sae_train.py

clean-venv:
	rm -rf $(VENV)
