# Two entry points for a new user: `make demo` and `make test`. Both build .venv once;
# the stamp file makes a re-run skip the install when pyproject.toml has not changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
EXTRAS ?= test,minilm,export,postgres,llamacpp
DEMO_OUT ?= runs/demo

.PHONY: setup llamacpp demo test results clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

# llama.cpp's converter and llama-quantize, from the llama-cpp-python 0.3.36 sdist on PyPI, built once into
# ~/.cache/mpsearch (about 8 min on 2 cores; a finished install returns at once): the gguf export's base files
# and the llama.cpp tests need them
llamacpp: setup
	$(PY) -m mpsearch.exporters.llama_runtime install

demo: setup
	$(VENV)/bin/mpsearch search --model digits --strategy pso --max-evals 200 --avg-bits 2.5 --seed 0 --out $(DEMO_OUT)

test: setup llamacpp
	$(PY) -m pytest -q

results: setup llamacpp
	$(PY) experiments/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
