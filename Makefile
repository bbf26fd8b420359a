# The README's two commands: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-fast test-slow test-cluster bench lint clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch/torchvision are unpinned in pyproject.toml; pip picks the build this
	# machine's configuration allows (a cluster image brings its own).
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m protein_ray.demo --out $(DEMO_DIR)

# Everything, as CI runs it: the fast suite, real training runs (slow) and the
# end-to-end test on a `ray start --head` cluster (cluster).
test: $(STAMP) browser
	$(BIN)/python -m pytest

# The quick loop while developing (~5 minutes on 2 cores).
test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -m "not slow and not cluster"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not cluster"

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster

# Headless Chromium for the HTML report's browser test (tests/test_report.py). Installing
# needs root and apt: where they are missing this says so and that test is skipped.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "make browser: could not install chromium (needs root and apt-get); the report's browser test will be skipped"

lint: $(STAMP)
	$(BIN)/python -m ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/predict_throughput.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf runs .pytest_cache
