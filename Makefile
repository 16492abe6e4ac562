# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test test-zoo test-arm arm-env test-deps bench clean venv

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mdeploy run

test: $(STAMP) test-deps
	$(PY) -m pytest

test-zoo: $(STAMP)
	$(PY) -m pytest -m "zoo or sweep" -p no:cacheprovider

# System packages need root (sudo is used when not root); the rest is built rootless-ish
# into ~/.cache/mdeploy/aarch64 by `mdeploy doctor --fix arm` (debootstrap's download
# step needs root too). About 3 minutes and 5 GB on a fresh machine (4.7 GB of it is torch,
# which ExecuTorch's runtime links, and the CUDA libraries PyPI's aarch64 torch links);
# a no-op when present.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARM_PKGS := qemu-user debootstrap gcc xz-utils

arm-env: $(STAMP)
	@command -v qemu-aarch64 >/dev/null && command -v gcc >/dev/null && command -v xz >/dev/null \
	  && { command -v debootstrap >/dev/null || test -x /usr/sbin/debootstrap; } \
	  || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(ARM_PKGS); }
	$(SUDO) $(VENV)/bin/mdeploy doctor --fix arm -q

# openssh-server for tests/test_ssh_device.py (a loopback sshd the test starts itself)
test-deps:
	@command -v sshd >/dev/null || test -x /usr/sbin/sshd \
	  || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q openssh-server openssh-client; }

test-arm: $(STAMP) arm-env
	$(PY) -m pytest -m arm

bench: $(STAMP)
	$(PY) -m bench.forward_latency

clean:
	rm -rf $(VENV) runs .pytest_cache
