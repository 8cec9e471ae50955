# The two commands of the README: `make demo` runs the main job on the embedded default
# (a local Ray), `make test` runs the test suite (what CI runs). Both create .venv on first use.
# `make test-fast` is the development loop: the tests that start neither Ray nor moto.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: test test-fast lint demo venv lock clean gpu-wheels

venv: $(STAMP)

# Re-installs only when the lock or the package metadata changed.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

LINT_PATHS := hipt_ray tests bench jobs

# What CI runs: the habits (lint, formatter, types), then every test.
test: lint
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The development loop: the tests that start neither Ray nor moto (pytest exits 5 when the
# selection is empty, so a marker mix-up cannot pass as a green run).
test-fast: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not ray and not s3" $(PYTEST_ARGS)

# ruff's rules (pyproject: pyflakes, bugbear, pycodestyle errors, line length 120, import order,
# pyupgrade), the formatter's check, and mypy over the paths [tool.mypy] names.
lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/python -m mypy

demo: $(STAMP)
	$(BIN)/python -m hipt_ray.demo --out $(DEMO_OUT)

# Regenerates the pinned lock from the top-level requirements (requirements.in).
lock:
	rm -rf /tmp/hipt-ray-lock && $(PYTHON) -m venv /tmp/hipt-ray-lock
	/tmp/hipt-ray-lock/bin/pip install --quiet -r requirements.in
	/tmp/hipt-ray-lock/bin/pip freeze --exclude-editable | grep -v '^hipt-ray' > requirements.txt

# The wheels bench/gpu_check.py --no-ray needs on a machine with torch but no network (the
# device machines' image), into build/gpu-wheels (bench/gpu_wheels.sh says which and why).
gpu-wheels: $(STAMP)
	PIP=$(BIN)/pip bash bench/gpu_wheels.sh

clean:
	rm -rf $(VENV) $(DEMO_OUT)
