# make run: start the server from a fresh clone (installs the package and what running needs);
# make test: lint, type-check and the fast tests (under three minutes); make test-all: every test,
# the slow ones too (subprocess servers, fuzzing, the browser, the Node clients), what CI runs;
# make bench: latency, voice, retrieval and capacity, written to docs/benchmarks.md; make soak.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -q -ra --durations=15 -n 2

.PHONY: run test test-all lint bench bench-knowledge soak clean

$(VENV)/.run: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.dev: $(VENV)/.run requirements-dev.txt clients/package-lock.json
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dev.txt
	if command -v npm >/dev/null; then cd clients && npm ci --no-audit --no-fund --loglevel=error; fi
	touch $@

run: $(VENV)/.run
	$(VENV)/bin/custom-llm serve

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PYTEST) -m "not slow"

test-all: lint
	$(PYTEST)

$(VENV)/.bench: $(VENV)/.dev bench/requirements-compare.txt
	$(PY) -m pip install --quiet -r bench/requirements-compare.txt
	touch $@

bench: $(VENV)/.bench
	$(PY) bench/bench.py
	$(PY) bench/voice.py
	$(PY) bench/retrieval.py
	$(PY) bench/waiting.py
	$(PY) bench/capacity.py

bench-knowledge: $(VENV)/.bench
	$(PY) bench/retrieval.py
	$(PY) bench/turn.py

soak: $(VENV)/.dev
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
