# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when needed, install torch==2.13.0 there if no torch is importable, then the requirements.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastvar-installed
ARGS ?=

.PHONY: demo test test-fast parity-mutants parity-floor bench bench-quick e2e-models clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# The parity self-check (docs/parity.md): every injected fault must fail a parity test. Not part of `make test`.
parity-mutants: $(STAMP)
	$(PY) tools/parity_mutants.py $(ARGS)

# The float noise floor of the sampled HART parity cases that the sampled-case tolerances come from.
parity-floor: $(STAMP)
	$(PY) tools/parity_floor.py $(ARGS)

bench: $(STAMP)
	$(PY) -m tools.bench $(ARGS)

bench-quick: $(STAMP)
	$(PY) -m tools.bench --quick $(ARGS)

# Lay the tiny official-format checkpoints out like ComfyUI's models/ folder: make e2e-models DIR=/tmp/models
e2e-models: $(STAMP)
	@test -n "$(DIR)" || (echo "usage: make e2e-models DIR=<models dir>"; exit 2)
	$(PY) -m tools.tiny_models "$(DIR)"

clean-venv:
	rm -rf $(VENV)
