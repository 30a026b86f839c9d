# make run: start the server from a fresh clone; make test: the whole suite;
# make bench: the latency benchmark; make soak: thousands of streams with faults and hang-ups.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench bench-knowledge soak clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed
	$(PY) custom_llm.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/bench.py
	$(PY) bench/voice.py
	$(PY) bench/retrieval.py

bench-knowledge: $(VENV)/.installed
	$(PY) bench/retrieval.py

soak: $(VENV)/.installed
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache
