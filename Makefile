# On a fresh Debian machine:
#   make run    install what is missing, then run the daemon on ./mountpoint
#   make test   install what is missing plus the test extras, then run the tests
#   make campaign   the detect campaign on a local cluster (docs/campaigns.md)
# Debian's python3 is externally managed (PEP 668), so the package goes into a virtualenv;
# it sees the system site-packages, so whatever is installed already is reused.

VENV    := .venv
PY      := $(VENV)/bin/python
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
MOUNT   ?= mountpoint

.PHONY: run test deps clean campaign

deps:
	@if ! command -v fusermount >/dev/null 2>&1 || ! /sbin/ldconfig -p | grep -q 'libfuse\.so\.2 '; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y fuse libfuse2; \
	fi
	@if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y python3-venv python3-pip; \
	fi

$(PY): | deps
	python3 -m venv --system-site-packages $(VENV)

$(VENV)/.run: pyproject.toml | $(PY)
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[test,campaign]'
	touch $@

# Address-space isolation is off by default, as in the RFC series; `make run` and the systemd
# unit load it on, so that kvm/fault_log has something to show out of the box.
run: deps $(VENV)/.run
	$(PY) -m mmud run --mount $(MOUNT) --param address_space_isolation=1

test: deps $(VENV)/.test
	$(PY) -m pytest -q

# The detect campaign (campaigns/detect.toml) on a local cluster of one worker per core;
# results in ./campaign-detect (docs/campaigns.md); run again, it goes on where it stopped.
# QUICK=1 runs its reduced grid (into ./campaign-detect-quick).
campaign: deps $(VENV)/.test
	$(VENV)/bin/mmud campaign run campaigns/detect.toml --resume $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV)
