# The two commands of the README. Each installs what it needs first (scripts/bootstrap.sh).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test bootstrap bench

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/spear demo

test: bootstrap
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: bootstrap
	$(VENV)/bin/python bench/decode.py
