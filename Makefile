# The two commands of the README:
#   make demo   set up .venv from nothing, train a small model on mnist-5k, sample a grid
#   make test   set up .venv from nothing (with test extras) and Chromium, run the whole suite
# TORCH is the pip spec for PyTorch; a GPU user passes their own, e.g.
#   make demo TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test install chromium clean

demo: $(VENV)/.installed-demo
	$(BIN)/ddpm demo

test: chromium $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# tests/test_report.py opens the report in headless Chromium: Debian's package, installed
# here when it is missing and apt-get may install (root, or sudo without a password);
# otherwise make test stops at once, before any set-up, with one line naming the command.
chromium:
	@command -v chromium >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="no"; fi; \
	if [ "$$sudo" = no ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make test: the report test needs headless Chromium on the PATH: run sudo apt-get install -y chromium (Debian/Ubuntu), then make test again" >&2; \
	  exit 1; \
	fi; \
	echo "make test: installing Debian's chromium for the report test: $${sudo:+$$sudo }apt-get install -y chromium"; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null || exit 1; \
	command -v chromium >/dev/null 2>&1 || { echo "make test: apt-get installed chromium, but there is no chromium on the PATH" >&2; exit 1; }

install: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Torch first and on its own, so the spec chosen here is what the package's
# torch requirement finds already satisfied.
$(VENV)/.installed-demo: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[mnist5k]"
	touch $@

# torch-fidelity: the independent FID Inception port the tests compare ours with; installed
# --no-deps because its dependencies pull torchvision (a multi-GB CUDA torch).
$(VENV)/.installed-test: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps torch-fidelity==0.4.0
	touch $@ $(VENV)/.installed-demo

clean:
	rm -rf $(VENV) runs .pytest_cache
