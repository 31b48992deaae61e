# The README's two commands: `make demo` (run the simulator on the built-in default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/prescient simulate

test: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/sim_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
