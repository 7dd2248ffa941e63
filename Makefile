# The two set-up commands of the README. Each creates (or reuses) .venv, installs what it needs with the
# exact pins of requirements/constraints.txt (torch first, so a CPU machine never pulls a CUDA build), then
# runs the demo / the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PINS := requirements/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): setup.py $(PINS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c $(PINS) torch numpy
	$(PIP) install -q --disable-pip-version-check -c $(PINS) --no-deps --no-build-isolation deepspeed
	$(PIP) install -q --disable-pip-version-check -c $(PINS) -e ".[dev,dali,latent,deepspeed,tensorboard]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fastonestep demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
