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

# A Debian package: install it when we may (root, or sudo without a password), else say
# exactly how. $(1) package, $(2) what it is for.
define apt_install
if [ "$$(id -u)" = 0 ]; then \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1); \
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1); \
else \
	echo "$(1) is not installed and this user cannot install it ($(2)). Run:"; \
	echo "    sudo apt-get install -y $(1)"; \
	exit 1; \
fi
endef

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then exit 0; fi; \
	$(call apt_install,mosquitto,the tests and the demo start their own broker); \
	if command -v systemctl >/dev/null 2>&1; then (systemctl disable --now mosquitto >/dev/null 2>&1 || true); fi

# The browser tests drive Debian's chromium through Playwright (its own browser download
# is not used).
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	$(call apt_install,chromium,the browser tests drive it)

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
