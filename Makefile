# netweft: every target works on a fresh Debian 12 machine as root and is safe to re-run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEBS := python3 python3-venv iproute2 iputils-ping nftables libnftables1 util-linux procps iperf3 etcd-server dnsperf
PYTEST_ARGS ?=

.PHONY: install demo test unit clean-lab bench

install: $(STAMP)

$(STAMP): pyproject.toml
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)
	@echo "installed: $(VENV)/bin/netweft and $(VENV)/bin/netweftd"

demo: install
	$(VENV)/bin/python -m netweft.lab.demo

test: install
	$(VENV)/bin/python -m netweft.lab.cleanup --tests-only --quiet
	$(VENV)/bin/pytest -p no:cacheprovider $(PYTEST_ARGS) tests

unit: install
	$(VENV)/bin/pytest -p no:cacheprovider tests/unit

clean-lab:
	@if [ -x $(VENV)/bin/python ]; then $(VENV)/bin/python -m netweft.lab.cleanup; \
	else echo "nothing to clean: netweft is not installed"; fi

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done
