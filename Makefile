# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test test-zoo test-arm bench clean venv

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mdeploy run

test: $(STAMP)
	$(PY) -m pytest

test-zoo: $(STAMP)
	$(PY) -m pytest -m zoo -p no:cacheprovider

test-arm: $(STAMP)
	$(PY) -m pytest -m arm

bench: $(STAMP)
	$(PY) -m bench.forward_latency

clean:
	rm -rf $(VENV) runs .pytest_cache
