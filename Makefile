# Set-up on a fresh machine is part of every target: the first run creates .venv from the committed
# lock (requirements/*.txt) with uv, later runs reuse it. `make lock` refreshes the lock.
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed-stamp
LOCKS := requirements
# This machine kind keeps CPU builds of torch on disk; uv does not read pip's configuration.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
UV_INSTALL = $(UV) pip install -q --python $(1)/bin/python $(FIND_LINKS)

.PHONY: demo replicas test test-main test-wheel test-jetstream test-latest lock device-wheels clean suffix-decoding

# uv itself is bootstrapped into each venv with pip (one wheel); everything else comes from the lock.
define make_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
endef

$(STAMP): $(LOCKS)/test.txt pyproject.toml setup.py
	$(call make_venv,$(VENV))
	$(call UV_INSTALL,$(VENV)) -r $(LOCKS)/test.txt
	$(call UV_INSTALL,$(VENV)) --no-deps -e .
	touch $(STAMP)

# JetStream interoperability runs in its own venv: google-jetstream's real dependencies pull
# TensorFlow (through seqio, which its orchestrator imports) and must not enter the main one.
JS_VENV := .venv-jetstream
JS_STAMP := $(JS_VENV)/.installed-stamp

$(JS_STAMP): $(LOCKS)/jetstream.txt pyproject.toml setup.py
	$(call make_venv,$(JS_VENV))
	$(JS_VENV)/bin/uv pip install -q --python $(JS_VENV)/bin/python $(FIND_LINKS) -r $(LOCKS)/jetstream.txt
	$(JS_VENV)/bin/uv pip install -q --python $(JS_VENV)/bin/python --no-deps -e .
	touch $(JS_STAMP)

# The main job on the built-in default (configs/cpu_demo.py, bundled traces), a few minutes on 2 CPU cores.
demo: $(STAMP)
	$(PY) experiments/agent_e2e.py --quick --repeats=3

# N agentinfer-serve replicas behind the SGLang Model Gateway on this host (router on 127.0.0.1:30000),
# until Ctrl-C. ROUTING: session (sticky per x-smg-routing-key), cache_aware, round_robin, power_of_two, random.
REPLICAS ?= 2
ROUTING ?= session
SERVE_ARGS ?= --config tiny
replicas: $(STAMP)
	$(VENV)/bin/agentinfer-replicas --replicas $(REPLICAS) --policy $(ROUTING) -- $(SERVE_ARGS)

# The whole test suite on CPU: the main suite (Pallas kernels in interpret mode, 8 fake devices
# for sharding), the built wheel installed outside the checkout, then our engine under JetStream's
# orchestrator in the JetStream venv. pytest runs from its console script, never `python -m`, so
# the checkout root is not on sys.path: tests import the installed package and our top-level
# kernels/ cannot shadow the PyPI distribution of that name.
test: test-main test-wheel test-jetstream

test-main: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile tests

test-wheel: $(STAMP)
	$(PY) tools/check_wheel.py --lock $(LOCKS)/core.txt

test-jetstream: $(JS_STAMP)
	$(JS_VENV)/bin/pytest -q tests_jetstream

# Drift check, not part of CI: the same suite against the newest releases the registry serves
# (torch stays on the machine's CPU build).
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(call make_venv,$(LATEST_VENV))
	$(call UV_INSTALL,$(LATEST_VENV)) --upgrade -e '.[test]'
	$(LATEST_VENV)/bin/uv pip freeze --python $(LATEST_VENV)/bin/python > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/pytest -q -n 2 --dist loadfile tests

# The real SuffixDecoding (arctic-inference 0.3.0's suffix-tree cache) from the registry's sdist, into
# build/suffix_decoding: the baseline drafters of experiments/sam_acceptance.py, never a dependency.
suffix-decoding: $(STAMP)
	$(PY) tools/build_suffix_decoding.py

# Re-resolve every lock against today's registry (Python 3.11, this platform).
LOCK_CMD = $(UV) pip compile -q --python-version 3.11 $(FIND_LINKS) --no-header --annotation-style line
lock: $(STAMP)
	$(LOCK_CMD) pyproject.toml -o $(LOCKS)/core.txt
	$(LOCK_CMD) pyproject.toml --extra test -o $(LOCKS)/test.txt
	$(LOCK_CMD) pyproject.toml --extra cuda -o $(LOCKS)/cuda.txt
	$(LOCK_CMD) pyproject.toml --extra tpu -o $(LOCKS)/tpu.txt
	$(LOCK_CMD) pyproject.toml $(LOCKS)/jetstream-test.in --extra jetstream -o $(LOCKS)/jetstream.txt

# Wheels the accelerator image lacks (it has JAX, flax, optax, orbax, torch...), for Python 3.12 there,
# at the lock's versions: tools/device_bench.sh installs them with no registry.
DEVICE_PKGS := pygtrie bm25s numba llvmlite fastapi starlette pydantic pydantic-core annotated-types annotated-doc \
	typing-inspection uvicorn
device-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl setuptools==84.2.1 $$(for p in $(DEVICE_PKGS); do grep -E "^$$p==" $(LOCKS)/core.txt | cut -d' ' -f1; done)
	du -sh .whl

clean:
	rm -rf $(VENV) $(JS_VENV) $(LATEST_VENV) .pytest_cache .hypothesis build
