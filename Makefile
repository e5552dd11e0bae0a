# netweft: every target works on a fresh Debian 12 machine as root and is safe to re-run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEBS := python3 python3-venv iproute2 iputils-ping nftables libnftables1 util-linux procps iperf3 etcd-server podman docker.io busybox runc containernetworking-plugins chromium wireguard-go tcpdump dnsperf systemd
CNI_BIN_DIR ?= /opt/cni/bin
PYTEST_ARGS ?=

.PHONY: install demo test unit clean-lab bench install-service

install: $(STAMP)
	@$(VENV)/bin/netweft install-cni --bin-dir $(CNI_BIN_DIR)

$(STAMP): pyproject.toml
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	# compat: a plain path in a .pth; the default editable finder imports pathlib & co. in every Python start (~20 ms)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
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

# The systemd unit, an example configuration (kept if one exists) and the shell completions. Not enabled.
install-service: install
	install -d -m 0755 /etc/netweft /usr/share/bash-completion/completions /usr/share/zsh/vendor-completions
	sed 's|@NETWEFTD@|$(CURDIR)/$(VENV)/bin/netweftd|' packaging/netweftd.service > /etc/systemd/system/netweftd.service
	chmod 0644 /etc/systemd/system/netweftd.service
	[ -e /etc/netweft/netweftd.toml ] || install -m 0600 packaging/netweftd.toml /etc/netweft/netweftd.toml
	install -m 0644 packaging/completion/netweft.bash /usr/share/bash-completion/completions/netweft
	install -m 0644 packaging/completion/_netweft /usr/share/zsh/vendor-completions/_netweft
	-systemctl daemon-reload 2>/dev/null
	@echo "installed netweftd.service (not enabled): systemctl enable --now netweftd"
