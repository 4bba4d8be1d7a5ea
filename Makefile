# Everything a fresh machine needs goes through these targets: `make demo` and `make test` install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(CURDIR)/.towerflow/prefect
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false

.PHONY: install demo test lint data-ml100k peer-recbole bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# Prefect makes its home without parents (a warning, then a server with no database): make it here.
demo: install
	@mkdir -p "$(PREFECT_HOME)"
	$(PY) -m towerflow.demo

test: install
	@mkdir -p "$(PREFECT_HOME)"
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# MovieLens-100K, fetched from PyPI inside the recbole==1.2.1 wheel and verified by sha256; never committed.
data-ml100k: install
	$(PY) scripts/fetch_ml100k.py

# Every benchmark in the README, one after another (about 50 minutes on an idle 2-core machine, plus 30-45 for
# bench.public_path: SASRec and two retrains); each prints its table
# and writes bench/results/<name>.json. Run one alone with the command shown in the README.
bench: install data-ml100k peer-recbole
	$(PY) -m bench.generate_events --streaming-check
	$(PY) -m bench.train_throughput
	$(PY) -m bench.embed_items
	$(PY) -m bench.index
	$(PY) -m bench.retrain_e2e --threads 1 --epochs 3
	$(PY) -m bench.scaling --threads 1
	$(PY) -m bench.quality --threads 1
	$(PY) -m bench.serving
	$(PY) -m bench.movielens --threads 1 --sasrec
	$(PY) -m bench.public_path --ratings --sasrec

# A peer library for side-by-side quality runs (python -m bench.movielens --sasrec), in its OWN venv: RecBole 1.2.1
# needs numpy 1 / pandas 2, the product runs numpy 2 / pandas 3. Pins and why: docs/architecture.md, "Dependency pins".
PEER_VENV ?= .venv-recbole
peer-recbole: $(PEER_VENV)/.installed-stamp

$(PEER_VENV)/.installed-stamp:
	@test -x $(PEER_VENV)/bin/python || python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PEER_VENV)/bin/python -m pip install -q --disable-pip-version-check recbole==1.2.1 numpy==1.26.4 pandas==2.1.4 \
		scipy==1.11.4 'setuptools>=77.0.3,<82' ray==2.6.3
	@touch $@

clean:
	rm -rf .towerflow .pytest_cache
