# Two commands do all the set-up on a fresh Debian/Ubuntu machine:
#   make demo   train a model, run the agent and the cloud on a generated video
#   make test   the full test suite (real Mosquitto, SQLite, OpenCV, TFLite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: all setup mosquitto chromium test demo lint bench clean help

help:
	@echo "make demo    set up, then train, run the agent and show the results"
	@echo "make test    set up, then run the test suite"
	@echo "make lint    ruff + mypy"
	@echo "make bench   benchmarks; figures go to docs/benchmarks.md"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "Python 3.10 or newer is needed (found $$($(PYTHON) --version))"; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
		{ echo "python3-venv is missing: sudo apt-get install -y python3-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[edge,cloud,training,dev]'
	@touch $(STAMP)

setup: $(STAMP) mosquitto chromium

# Mosquitto is a system package: install it when we may, else say exactly how.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; \
	else \
		echo "Mosquitto is not installed and this user cannot install it. Run:"; \
		echo "    sudo apt-get install -y mosquitto"; \
		exit 1; \
	fi; \
	# The tests and demo start their own broker; the packaged service is not needed. \
	if command -v systemctl >/dev/null 2>&1; then (systemctl disable --now mosquitto >/dev/null 2>&1 || true); fi

# The browser tests drive Debian's chromium through Playwright (its own browser download
# is not used): install the system package the same way.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "Chromium is not installed and this user cannot install it (the browser tests need it). Run:"; \
		echo "    sudo apt-get install -y chromium"; \
		exit 1; \
	fi

test: setup
	$(PY) -m pytest -n $(JOBS) --timeout 600 tests

demo: setup
	$(VENV)/bin/linewatch demo

lint: $(STAMP)
	$(VENV)/bin/ruff check edge cloud training tests benchmarks
	$(VENV)/bin/mypy edge cloud training

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache .mypy_cache .ruff_cache
