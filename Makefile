# Two commands do everything: `make test` and `make demo`. Both create or refresh .venv/ first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo venv bench realsize clean

venv: $(STAMP)

# torch first, from the local CPU wheel, so nothing later can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip check
	touch $(STAMP)

# Lint and type-check first (configured in pyproject.toml); any failure stops make.
test: $(STAMP)
	$(PY) -m ruff check lorabridge tests tools bench
	$(PY) -m mypy lorabridge
	$(PY) -m pytest -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) -m lorabridge.demo demo-output

bench: $(STAMP)
	$(PY) bench/convert_bench.py

# Real-size SDXL parity, time and peak memory on both backends (CPU, ~20 GB of memory, tens of minutes); writes
# bench/RESULTS-infer-realsize.md. REALSIZE_BASE=DIR keeps the 7 GB random base there between runs.
realsize: $(STAMP)
	$(PY) -m pytest -m realsize -p no:cacheprovider tests/test_infer_realsize.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
