# One command to run a local cluster, one to run the tests. Needs only python3 (>= 3.11).
VENV ?= .venv
PY := $(VENV)/bin/python
NODES ?= 6
SHARDS ?= 2
PORT ?= 8081

.PHONY: cluster test lint unit bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

cluster:  ## start a local multi-node cluster as plain processes (Ctrl-C stops it)
	python3 devenv.py -n $(NODES) --shards $(SHARDS) --base-port $(PORT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check trio_kv tests chaos bench devenv.py
	$(VENV)/bin/mypy trio_kv

test: lint  ## every tier; the network tiers skip with a reason when not root
	$(VENV)/bin/pytest -q -ra

unit: $(VENV)/.installed  ## core + in-process cluster tests only (seconds)
	$(VENV)/bin/pytest -q -ra --ignore=tests/realnet

bench: $(VENV)/.installed
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
