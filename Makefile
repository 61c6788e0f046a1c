# kdlab: two commands do everything on a fresh machine (see README.md).
#   make demo   set up .venv and run the main job on the generated shapes data
#   make test   set up .venv and run every test, notebooks included (nbval)
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.kdlab-setup
PIP    := $(VPY) -m pip install --progress-bar off -q
# pinned so pip never resolves another torch (the CPU/CUDA wheels of these versions)
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast notebooks nbval-matrix clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e ".[test,notebooks]" $(TORCH)
	touch $(STAMP)

demo: setup
	$(VPY) -m kdlab demo --out outputs/demo

test: setup
	KDLAB_PROFILE=quick $(VPY) -m pytest tests notebooks --nbval --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider

test-fast: setup
	$(VPY) -m pytest tests -m "not slow" -p no:cacheprovider

# re-execute every notebook in place (stored outputs for nbval), quick profile, with the CPU numerics
# nbval's kernels get (notebooks/conftest.py, notebooks/execute.py)
notebooks: setup
	$(VPY) notebooks/execute.py notebooks/[0-9]*.ipynb

# nbval over every notebook under CPU kernel settings that change the last bits (ATen capability, oneDNN
# ISA, MKL_CBWR, threads; a pairwise covering array + the machine default + the legacy pins): the pass
# table and the spread of every checked figure go to notebooks/nbval_matrix.md (about 8 x make test's time)
nbval-matrix: setup
	$(VPY) notebooks/nbval_matrix.py

clean:
	rm -rf outputs runs .pytest_cache
