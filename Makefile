# Set-up on a fresh machine is part of every target: the first run creates .venv, later runs reuse it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job on the built-in default (tiny model, bundled traces), a few minutes on 2 CPU cores.
demo: $(STAMP)
	$(PY) experiments/agent_e2e.py --quick --repeats=2

# The whole test suite on CPU (Pallas kernels in interpret mode, 8 fake devices for sharding).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
