# The two commands of the quick start: `make run` and `make test`.
# Installs come from requirements/constraints.txt, the pinned set that `make test` passed on, so a
# fresh clone next month gets what CI tested. pyproject.toml keeps ranges for people who install
# mmdiff into their own environment; `make test-latest` checks the newest versions those ranges allow.
# CPU machines get the CPU build of torch (TORCH_SPEC) and never CUDA packages. GPU users:
# create .venv and install your own CUDA torch into it first; `make` keeps whatever torch it finds.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_SPEC ?= pip==26.3
CONSTRAINTS := requirements/constraints.txt
LATEST ?= .venv-latest
OLDEST ?= .venv-oldest
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.mmdiff-run
TEST_STAMP := $(VENV)/.mmdiff-test
PYTEST_ARGS ?= -q -p no:cacheprovider

.PHONY: run test test-latest test-oldest lock venv bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(PIP_SPEC)"

# What running a study needs: mmdiff and its dependencies, nothing for tests or benchmarks.
$(RUN_STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --constraint $(CONSTRAINTS) -e .
	@touch $(RUN_STAMP)

# The test suite also needs pytest, the real peers (sae-lens, eai-sparsify) and the easy-VQA data.
$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet --constraint $(CONSTRAINTS) -e ".[test,peers,data]"
	@touch $(TEST_STAMP)

venv: $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/mmdiff run

test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The newest versions pyproject.toml's ranges allow (torch excepted: the CPU build of TORCH_SPEC),
# in a scratch venv, then the whole suite: a break in a new release shows here before users see it.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(LATEST)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(LATEST)/torch.txt
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager --constraint $(LATEST)/torch.txt -e ".[test,peers,data]"
	@$(LATEST)/bin/python -c "import importlib.metadata as m; print('test-latest:', ', '.join(p + ' ' + m.version(p) for p in ('torch', 'transformers', 'tokenizers', 'huggingface-hub', 'safetensors', 'typer', 'click', 'pydantic', 'sae-lens', 'eai-sparsify')))"
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

# The lower bounds of pyproject.toml's ranges (requirements/oldest.txt; torch: TORCH_SPEC), with the
# test extra only (the peers and the easy-VQA data need newer releases; their tests skip).
# Why each bound is where it is: the comments in requirements/oldest.txt and docs/design.md.
test-oldest:
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet "$(PIP_SPEC)"
	$(OLDEST)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(OLDEST)/bin/pip install --quiet --constraint requirements/oldest.txt -e ".[test]"
	@$(OLDEST)/bin/python -c "import importlib.metadata as m; print('test-oldest:', ', '.join(p + ' ' + m.version(p) for p in ('torch', 'transformers', 'tokenizers', 'huggingface-hub', 'safetensors', 'typer', 'click', 'numpy', 'pandas', 'pyarrow', 'pydantic')))"
	$(OLDEST)/bin/python -m pytest $(PYTEST_ARGS)

# Refresh the pins: test-latest, and only if the suite passed, its versions become the constraints.
lock: test-latest
	{ sed -n '/^# /p' $(CONSTRAINTS); \
	  $(LATEST)/bin/pip freeze --exclude-editable | grep -v -E '^(torch|mmdiff)=='; } > $(CONSTRAINTS).new
	sed -i 's/^# Python 3.11, Linux x86-64, refreshed .*/# Python '"$$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())')"', '"$$(uname -s) $$(uname -m)"', refreshed '"$$(date -u +%F)"'./' $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@echo "$(CONSTRAINTS) refreshed from $(LATEST); review the diff, then commit it"

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/capture.py
	$(BIN)/python benchmarks/sae_train.py

clean-venv:
	rm -rf $(VENV) $(LATEST) $(OLDEST)

# On a CUDA machine: CUDA tests, GPU benchmarks and the organism study on the GPU within 10 minutes,
# summarised in gpu-check/summary.json. Elsewhere it says so and fails.
.PHONY: gpu-check
gpu-check: $(TEST_STAMP)
	$(BIN)/python scripts/gpu_check.py
