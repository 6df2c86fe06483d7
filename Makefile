# criu-livedump: `make test` is the one command CI and developers run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
PYTEST_ARGS ?=
ARGS ?=

.PHONY: setup test lint unit demo bench soak fuzz clean arm64-fixtures test-arm64

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup:
	bash scripts/setup.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	bash scripts/demo.sh

bench: setup
	$(PY) bench/run.py $(ARGS)

soak: setup
	$(PY) -m pytest -m slow tests/ $(PYTEST_ARGS) --soak

fuzz: setup
	$(PY) -m pytest tests/test_fuzz.py --fuzz-full $(PYTEST_ARGS)

# the aarch64 golden fixtures, made in an emulated arm64 guest (minutes; see README "arm64")
arm64-fixtures:
	bash tests/arm64/make-fixtures.sh

# the live-dump kernel comparisons (both methods) in the emulated arm64 guest, with its CRIU
# 4.2.1 and the project's venv there (about 11 minutes; README "arm64")
test-arm64:
	bash tests/arm64/test-arm64.sh

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache tests/programs/bin
