# Every target installs what it needs first (into .venv), so each is one command
# on a fresh machine with Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
NATIVE := $(VENV)/.native-$(shell cat app/engine/native/*.cpp | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: install evidence serve test lint model bench clean

install: $(STAMP) $(NATIVE)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[train,dev]"
	# newman (Postman's runner) for tests/e2e/api/test_newman.py and axe-core (accessibility, measured in the
	# browser by tests/e2e/api/test_page.py), where Node.js is installed
	if command -v npm >/dev/null 2>&1; then npm install -s --no-audit --no-fund --prefix $(VENV)/node newman@6.2.2 axe-core@4.11.0 \
	  || echo "warning: npm could not install newman and axe-core; their tests will fail or skip until it can"; fi
	rm -f $(VENV)/.installed-*
	touch $@

# MedAsk's C++ kernels (app/engine/native): g++ and ninja, about 15 s; without them the service keeps
# its other kernels, and the native kernels' tests fail until this succeeds
$(NATIVE): $(STAMP) $(wildcard app/engine/native/*.cpp)
	($(PY) -m app.engine.native build && rm -f $(VENV)/.native-* && touch $@) \
	  || echo "warning: could not build app/engine/native (needs g++); its kernels are unavailable"

evidence: install  ## the default evidence pack: verified, or rebuilt from vendored data against its committed manifest
	$(PY) -m training evidence --default

serve: evidence  ## serve model_artifacts/default (with the default evidence pack) on http://127.0.0.1:8000
	$(PY) -m app

test: install  ## the whole test suite (what CI runs)
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check app training tests benchmarks
	$(PY) -m ruff format --check app training tests benchmarks

model: install  ## rebuild the embedded default model (resumable)
	$(PY) -m training run --recipe training/recipes/default.yaml --out model_artifacts/default

bench: install
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf runs out logs .pytest_cache
