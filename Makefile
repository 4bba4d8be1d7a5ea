# Everything a fresh machine needs goes through these targets: `make demo` and `make test` install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(CURDIR)/.towerflow/prefect
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false

.PHONY: install demo test lint data-ml100k bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(PY) -m towerflow.demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# MovieLens-100K, fetched from PyPI inside the recbole==1.2.1 wheel and verified by sha256; never committed.
data-ml100k: install
	$(PY) scripts/fetch_ml100k.py

clean:
	rm -rf .towerflow .pytest_cache
