# `make serve` and `make test` set everything up on a fresh machine (Python 3.11).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install model serve test test-fast lint bench clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

model: install
	$(VENV)/bin/fusionserve build-model tiny

serve: model
	$(VENV)/bin/fusionserve serve

test: model
	$(PY) -m pytest

test-fast: model
	$(PY) -m pytest -m "not slow"

# ruff (lint + format) and mypy, as configured in pyproject.toml; CI runs this before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Every benchmark, each rewriting its README table (~45 min on 2 cores); each script has
# --quick for a short check.
bench: model
	$(PY) benchmarks/prompt_compression.py --update-readme README.md
	$(PY) benchmarks/serving_overhead.py --update-readme README.md
	$(PY) benchmarks/serving_overhead.py --size 64 --steps 1 --concurrency 1 --requests-per-level 40 \
	  --json benchmarks/results/serving_overhead_probe.json --update-readme README.md \
	  --readme-section serving_overhead_probe
	$(PY) benchmarks/text_encoder_cache.py --update-readme README.md
	$(PY) benchmarks/encoder_routing.py --update-readme README.md
	$(PY) benchmarks/denoiser_batching.py --update-readme README.md
	$(PY) benchmarks/denoiser_batching.py --model small --sizes 256,64 --concurrency 1,8 --update-readme README.md
	$(PY) benchmarks/unet_batch_scaling.py --update-readme README.md
	$(PY) benchmarks/unet_variants.py --update-readme README.md
	$(PY) benchmarks/adaptive_steps.py --update-readme README.md
	$(PY) benchmarks/adaptive_steps.py --early-stop --update-readme README.md
	$(PY) benchmarks/autoscaling.py --update-readme README.md
	$(PY) benchmarks/autoscaling.py --workload phases --update-readme README.md
	$(PY) benchmarks/edits.py --update-readme README.md

clean:
	rm -rf $(VENV) .pytest_cache
