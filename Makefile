# Two commands matter: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_DATA ?= data/demo
DEMO_RUN  ?= checkpoints/demo

.PHONY: demo test test-slow install install-dev lint clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/medclip-prep demo --output $(DEMO_DATA) --samples-per-shard 500 --overwrite --quiet
	rm -rf $(DEMO_RUN)
	$(PY) train.py fit --config configs/demo_cpu.yaml
	$(VENV)/bin/medclip-eval all --model $(DEMO_RUN)/last.ckpt --demo-data $(DEMO_DATA) \
		--output $(DEMO_RUN)/eval --summary $(DEMO_RUN)/summary.json

# Tests run in TEST_WORKERS pytest-xdist processes: on 2 cores two of them finish the suite 1.25x sooner (much of a
# test is process start-up and Python, which leaves a core idle) and the slow tests 1.4x sooner. TEST_WORKERS=0
# runs in this process (for a debugger).
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist worksteal)

# The suite without the multi-process and end-to-end tests (marked slow): under 10 minutes on 2 cores. CI runs it
# with TEST_MARK="slow or not slow": one collection and one pool of workers for both kinds.
TEST_MARK ?= not slow
test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "$(TEST_MARK)" $(XDIST) $(PYTEST_ARGS)

# Real processes: DDP ranks, torchrun/SLURM launches, signals, fault injection, README's own-data block. CI runs both.
test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m slow $(XDIST) $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_RUN)
