# Every target installs into .venv first if needed. Python 3.11 is what is tested.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRAIN_ARGS ?=

.PHONY: install train test test-slow test-ui bench soak lint ui clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Build synth_tiny if needed, train ds2_tiny for a fixed budget, evaluate on the held-out test split.
train: install
	$(PY) -m ds2exp.quickstart $(TRAIN_ARGS)

test: install
	$(PY) -m pytest -m "not slow" -q

test-slow: install
	$(PY) -m pytest -m slow -q

# The MLflow UI of a real sweep, checked in headless Chromium (Selenium); apt-get needs root.
test-ui: install
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)
	$(PY) -m pip install -q selenium
	$(PY) -m pytest -m slow -q tests/test_ui_browser.py

# torch is a bench-only baseline (the PyTorch row of the step table), not a package dependency.
bench: install
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m bench.run_all

# Random SIGKILL/resume cycles for SOAK_MINUTES (default 3, seeded by SOAK_SEED), then steps lost and the
# parameter difference against an uninterrupted run (bench/soak.py).
soak: install
	$(PY) -m bench.soak

lint: install
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check ds2exp tests bench train.py evaluate.py export.py

ui: install
	@echo "MLflow UI: http://127.0.0.1:5000  (store: sqlite:///$(CURDIR)/mlflow.db; Ctrl-C stops it)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs multirun/[0-9]* .pytest_cache
