# `make serve` and `make test` set everything up on a fresh machine (Python 3.11).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install model serve test test-fast lint bench clean browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

model: install
	$(VENV)/bin/fusionserve build-model tiny

serve: install  # the default model, portrait, ships in the package: nothing to build
	$(VENV)/bin/fusionserve serve

test: model browser
	$(PY) -m pytest

# Debian's Chromium for the playground's browser tests (Playwright drives it; its own browser
# download cannot work without internet). Installed once, when missing.
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; }

# Unit tests only: no model loaded, no Ray started.
test-fast: install
	$(PY) -m pytest -m "not slow and not component and not integration"

# ruff (lint + format) and mypy, as configured in pyproject.toml; CI runs this before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Every benchmark, each rewriting its README table and its committed results in
# benchmarks/results/ (~50 min on 2 cores); each has --quick for a short check, which writes
# to benchmarks/results/quick/ (git-ignored) instead.
bench: model
	$(PY) -m benchmarks.prompt_compression --update-readme README.md
	$(PY) -m benchmarks.portrait_quality --update-readme README.md
	$(PY) -m benchmarks.serving_overhead --update-readme README.md
	$(PY) -m benchmarks.serving_overhead --size 64 --steps 1 --concurrency 1 --requests-per-level 40 \
	  --json benchmarks/results/serving_overhead_probe.json --update-readme README.md \
	  --readme-section serving_overhead_probe
	$(PY) -m benchmarks.text_encoder_cache --update-readme README.md
	$(PY) -m benchmarks.encoder_routing --update-readme README.md
	$(PY) -m benchmarks.denoiser_batching --update-readme README.md
	$(PY) -m benchmarks.denoiser_batching --model small --sizes 256,64 --concurrency 1,8 --update-readme README.md
	$(PY) -m benchmarks.unet_batch_scaling --update-readme README.md
	$(PY) -m benchmarks.unet_variants --update-readme README.md
	$(PY) -m benchmarks.adaptive_steps --update-readme README.md
	$(PY) -m benchmarks.adaptive_steps --early-stop --update-readme README.md
	$(PY) -m benchmarks.autoscaling --update-readme README.md
	$(PY) -m benchmarks.autoscaling --workload phases --update-readme README.md
	$(PY) -m benchmarks.edits --update-readme README.md
	$(PY) -m benchmarks.face_fusion --update-readme README.md
	$(PY) -m benchmarks.adapter_sharing --update-readme README.md

clean:
	rm -rf $(VENV) .pytest_cache
