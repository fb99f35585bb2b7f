# The two commands of the README:
#   make demo   set up .venv from nothing, train a small model on mnist-5k, sample a grid
#   make test   set up .venv from nothing (with test extras), run the whole suite
# TORCH is the pip spec for PyTorch; a GPU user passes their own, e.g.
#   make demo TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test install clean

demo: $(VENV)/.installed-demo
	$(BIN)/ddpm demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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
