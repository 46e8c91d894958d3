# Every target installs into .venv first if needed. Python 3.11 is what is tested.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRAIN_ARGS ?=

.PHONY: install train train-dp test test-slow test-ui test-postgres bench soak lint ui clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Build synth_tiny if needed, train ds2_tiny_gru for 10 minutes (conf/experiment/quickstart.yaml), evaluate on the held-out test split.
train: install
	$(PY) -m ds2exp.quickstart experiment=quickstart $(TRAIN_ARGS)

# Data-parallel training: 2 processes on this machine through MindSpore's msrun (docs/scaling.md).
train-dp: install
	$(PY) train.py hardware.num_devices=2 dataset=synth_tiny model=ds2_tiny dataset.batch_size=8 \
		optimizer.lr=1.5e-3 trainer.max_steps=300 trainer.eval_every=100 trainer.checkpoint_every=100 $(TRAIN_ARGS)

test: install
	$(PY) -m pytest -m "not slow" -q

test-slow: install
	$(PY) -m pytest -m slow -q

# The MLflow UI of a real sweep, checked in headless Chromium (Selenium); apt-get needs root.
test-ui: install
	(command -v chromium && command -v chromedriver) >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)
	$(PY) -m pip install -q selenium
	DS2EXP_REQUIRE_BROWSER=1 $(PY) -m pytest -m slow -q tests/test_ui_browser.py

# MLflow server on a real PostgreSQL store (tests/test_postgres_tracking.py): installs Debian's PostgreSQL
# server if neither PATH nor /usr/lib/postgresql/*/bin has initdb; apt-get needs root.
test-postgres: install
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql)
	$(PY) -m pytest -m postgres -q

# torch is a bench-only baseline (the PyTorch row of the step table), not a package dependency.
bench: install
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m bench.run_all

# Random SIGKILL/resume cycles for SOAK_MINUTES (default 3, seeded by SOAK_SEED), starts alternating 2 and 1
# threads, kills spread over training; prints where each kill landed, steps lost and the parameter difference
# against uninterrupted runs on 2 and on 1 thread (bench/soak.py).
soak: install
	$(PY) -m bench.soak

lint: install
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check ds2exp tests bench train.py evaluate.py export.py

# The address printed is ds2exp's runs table with ?workflowType=machine_learning: MLflow 3 opens an
# experiment in its GenAI view unless the URL (or the browser's stored choice) says "Model training".
ui: install
	@echo "MLflow UI: $$($(PY) -c 'from ds2exp.training.summary import ui_landing; print(ui_landing("$(CURDIR)/mlflow.db"))')"
	@echo "  (store: sqlite:///$(CURDIR)/mlflow.db; Ctrl-C stops it)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs multirun/[0-9]* .pytest_cache
