# make run: start the server from a fresh clone (installs only what running needs);
# make test: lint, type-check and the whole suite; make bench: latency, voice, retrieval and capacity;
# make soak: thousands of streams with faults and hang-ups.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench bench-knowledge soak clean

$(VENV)/.run: requirements.txt constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.run requirements-dev.txt clients/package-lock.json
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dev.txt
	if command -v npm >/dev/null; then cd clients && npm ci --no-audit --no-fund --loglevel=error; fi
	touch $@

run: $(VENV)/.run
	$(PY) custom_llm.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -rs

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

soak: $(VENV)/.dev
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
