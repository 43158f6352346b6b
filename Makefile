# Two entry points: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Where torch comes from when the venv has none. Default: the CPU build.
# For CUDA, e.g.:  make test TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.gradmeta-installed
# Runtime deps of the peers installed with --no-deps (BackPACK would drag in torchvision).
PEER_DEPS := opacus pyhessian einops unfoldNd einconv linear_operator opt-einsum scipy

.PHONY: demo test test-fast bench env data clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch alone from TORCH_INDEX (a local wheel in pip's find-links also satisfies it), then its deps from PyPI.
	$(PY) -c "import torch" 2>/dev/null || { $(PIP) install --retries 1 --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX) && $(PIP) install "torch==$(TORCH_VERSION)"; }
	# Pin whatever torch is installed so no extra can swap it for a multi-GB CUDA build.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > constraints.txt
	$(PIP) install -c constraints.txt -e ".[test,meta,lora,lora-test]" $(PEER_DEPS)
	$(PIP) install -c constraints.txt --no-deps "backpack-for-pytorch>=1.6" "curvlinops-for-pytorch>=2.0"
	$(PY) -c "import torch, gradmeta; print('gradmeta ready, torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradmeta run tasks/gradients_digits.toml --out runs/demo --overwrite
	$(VENV)/bin/gradmeta report runs/demo
	$(VENV)/bin/gradmeta run tasks/lopt_eval_digits.toml --out runs/demo_lopt --overwrite
	$(VENV)/bin/gradmeta report runs/demo_lopt

test: $(STAMP)
	$(PY) -m pytest -q tests

# Everything except the tests marked slow (torchrun, notebooks, benchmark smoke tests).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Real Fashion-MNIST (IDX .gz files in /usr/share/datasets/fashion-mnist/) from Debian's package;
# optional: experiments read it when present, tests never need it.
data:
	apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }
	ls /usr/share/datasets/fashion-mnist/

bench: $(STAMP)
	$(PY) benchmarks/grads.py

clean:
	rm -rf $(VENV) runs constraints.txt
