# Two commands: `make train` and `make test`. Both create .venv and install the project when needed
# (idempotent: a second call skips straight to the work).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: setup data train test lint browser tcmalloc clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build these machines carry; a GPU machine may bring its own.
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,sweep,export,serve]"
	@touch $(STAMP)

setup: $(STAMP)

# Fetch Multi30k (or use $$MT_DATA_MIRROR), tokenize and cache it. Extra Hydra overrides: ARGS="...".
data: setup
	$(PY) scripts/prepare_data.py $(filter data.%,$(ARGS))

# The preset for this machine: experiment=gpu where CUDA is available, else experiment=cpu
# (configs/experiment/). Override with `make train EXPERIMENT=...`. Training prepares the data
# on first use, with the preset's vocabulary settings.
EXPERIMENT ?= $(shell $(PY) -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)

# tcmalloc, where Debian's libtcmalloc-minimal4 is installed (`make tcmalloc`), serves the training
# process's memory: freed memory is kept for reuse without the growth of glibc's heap
# (train/allocator.py, docs/benchmarks.md). `make train TCMALLOC=` runs on glibc's malloc; a
# LD_PRELOAD of your own is kept, after tcmalloc.
TCMALLOC ?= $(shell /sbin/ldconfig -p 2>/dev/null | awk '$$1 == "libtcmalloc_minimal.so.4" {print $$NF; exit}')

train: setup
	$(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC)$(if $(LD_PRELOAD),:$(LD_PRELOAD)) )$(PY) scripts/train.py experiment=$(EXPERIMENT) $(ARGS)

# One worker process per core (pytest-xdist); a module's tests stay together. ARGS="-n 0": serial.
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile $(ARGS)

# The browser that the page test of mt-serve drives (tests/test_serve.py; it skips without one):
# Debian's Chromium, installed with apt-get as root (sudo otherwise). Playwright comes with .[dev].
browser: setup
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium; }
	@chromium --version

# The allocator `make train` preloads where it is installed (Debian's libtcmalloc-minimal4).
tcmalloc:
	@/sbin/ldconfig -p | grep -q libtcmalloc_minimal.so.4 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4; }
	@/sbin/ldconfig -p | awk '$$1 == "libtcmalloc_minimal.so.4" {print $$NF; exit}'

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
