# The two commands a newcomer needs:
#   make demo   — installs what is needed, starts a private broker, 6 devices, an aggregator and
#                 a camera source on the shipped Fashion-MNIST bundle, injects failures, summarises.
#   make test   — installs what is needed and runs lint, type checks and the whole test suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint typecheck pytest setup setup-dev bundle clean

setup:
	@scripts/setup.sh

setup-dev:
	@scripts/setup.sh dev,train

demo: setup
	@$(VENV)/bin/mqttinfer demo

lint: setup-dev
	$(VENV)/bin/ruff check mqttinfer tests benchmarks
	$(VENV)/bin/ruff format --check mqttinfer tests benchmarks

typecheck: setup-dev
	$(VENV)/bin/mypy

pytest: setup-dev
	$(PY) -m pytest -q

test: lint typecheck pytest

# Re-train the shipped demo bundle (needs the train extra; several minutes on 2 cores).
bundle: setup-dev
	$(VENV)/bin/mqttinfer train all --dataset fashion-mnist --out mqttinfer/data/bundles/fmnist-demo --preset demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
