# The two commands: `make test` and `make demo`. Both create .venv and install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints-dev.txt
# torch is installed first, pinned for this project's dev machines only (never in pyproject).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: test demo venv lint format bench clean gpu-check

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) $(TORCH_PINS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/vmamba train

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/scan_cpu.py

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
