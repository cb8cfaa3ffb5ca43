# The two commands of the README. Each installs what it needs first (scripts/bootstrap.sh).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test bootstrap bench

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/spear demo

# --durations: CI's log names the slowest tests (the suite must stay well inside CI's 90 minutes)
test: bootstrap
	$(VENV)/bin/python -m pytest --durations=30 $(PYTEST_ARGS)

bench: bootstrap
	$(VENV)/bin/python bench/decode.py
