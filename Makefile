# Two entry points (README): `make demo` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the CPU build (a bare `torch` may pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	# the distribution is now mooncake-ft (same `mooncake` import): drop an editable install of the old name
	$(PY) -m pip uninstall -q -y mooncake 2>/dev/null || true
	# UCX from the CUDA 13 wheels (they work without a GPU); '.[test,cu12]' for a CUDA 12 driver instead
	$(PY) -m pip install -q -e '.[test,cu13]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m mooncake.demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q
