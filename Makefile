# Set-up on a fresh machine is part of every target: the first run creates .venv, later runs reuse it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
PY := $(VENV)/bin/python

.PHONY: demo test test-main test-jetstream bench clean

$(STAMP): pyproject.toml setup.py agentinfer_jax/speculation/_sam_native.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# JetStream interoperability runs in its own venv: google-jetstream's real dependencies pull
# TensorFlow (through seqio, which its orchestrator imports) and must not enter the main one.
JS_VENV := .venv-jetstream
JS_STAMP := $(JS_VENV)/.installed-stamp
JS_PY := $(JS_VENV)/bin/python

$(JS_STAMP): pyproject.toml
	test -x $(JS_PY) || $(PYTHON) -m venv $(JS_VENV)
	$(JS_PY) -m pip install -q --upgrade pip
	$(JS_PY) -m pip install -q -e '.[jetstream]' pytest
	touch $(JS_STAMP)

# The main job on the built-in default (tiny model, bundled traces), a few minutes on 2 CPU cores.
demo: $(STAMP)
	$(PY) experiments/agent_e2e.py --quick --repeats=2

# The whole test suite on CPU: the main suite (Pallas kernels in interpret mode, 8 fake devices
# for sharding), then our engine under JetStream's orchestrator in the JetStream venv.
test: test-main test-jetstream

test-main: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

test-jetstream: $(JS_STAMP)
	$(JS_PY) -m pytest -q tests_jetstream

clean:
	rm -rf $(VENV) $(JS_VENV) .pytest_cache .hypothesis
