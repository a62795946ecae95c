# memkern: `make demo` and `make test` set everything up on a fresh machine.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The CPU build on CPU-only machines; override (e.g. TORCH_SPEC=torch==2.11.0) elsewhere.
# Only installed when the environment has no torch yet, so a bare `torch` is never asked for.
# memkern itself is installed with its `test` extra, which includes the demo's (`demo`).
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.memkern-installed
SOURCES    := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: install demo test lint format bench info cuda-check clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q "setuptools>=64" wheel ninja
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	@# Triton before 3.8 runs its interpreter on numpy < 2.4 only ("only 0-dimensional arrays
	@# can be converted to Python scalars"); pyproject.toml cannot condition numpy on Triton.
	@$(PY) -c "import importlib.metadata as m, sys; v = m.version('triton').split('.')[:2]; sys.exit(tuple(map(int, v)) < (3, 8))" 2>/dev/null \
		|| $(PY) -m pip install -q "numpy<2.4"
	@touch $@

# The main job: distil, prune and quantise a small language model (about 5 minutes on 2
# cores), then every op against its dense FP32 baseline at small shapes.
demo: install
	$(VENV)/bin/memkern demo
	$(VENV)/bin/memkern bench --quick

# The Triton kernels run in Triton's interpreter on the CPU; MEMKERN_REQUIRE_BACKENDS turns
# a missing C++ build or Triton into test failures instead of skips. Two worker processes
# (the interpreter runs Python on one core each), each taking whole files, so a file's
# module-scoped fixtures (the sm_80/sm_90 compile) run once.
TEST_WORKERS ?= 2
test: install lint
	TRITON_INTERPRET=1 MEMKERN_REQUIRE_BACKENDS=cpp,triton $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -v --durations=15 tests

# ruff (configured in pyproject.toml): the code must be formatted and lint-clean.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The full microbenchmarks at the shapes the results tables quote; rows go to the CSV.
bench: install
	$(VENV)/bin/memkern bench --csv bench/results/cpu.csv

info: install
	$(VENV)/bin/memkern info

# Compile every csrc/cuda/*.cu for sm_80 and sm_90 (no CUDA build of torch needed).
cuda-check: install
	$(PY) -m pytest -v tests/test_cuda_compile.py

clean:
	rm -rf build *.egg-info memkern/_C*.so .pytest_cache .benchmarks
