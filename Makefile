# Two commands on a fresh machine:
#   make run    install everything into .venv and run the main job
#   make test   install everything into .venv (the integrations' extras too), lint (ruff) and run the test suite
PYTHON ?= python3
VENV ?= .venv
# Pin torch to the local CPU wheel by default; `make TORCH_CONSTRAINT= run` lifts the pin.
TORCH_CONSTRAINT ?= -c constraints.txt
RUN_DIR ?= runs/quick

.PHONY: install run test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_CONSTRAINT) -e ".[test]"
	touch $@

# the integrations' packages (Lightning, transformers, TensorBoard, W&B, MLflow) and Ray: the tests use them, the main job never
$(VENV)/.installed-integrations: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet $(TORCH_CONSTRAINT) -e ".[test,integrations,ray]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/optmech reproduce --preset quick --out $(RUN_DIR) --jobs 2 --overwrite

test: $(VENV)/.installed-integrations
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs
