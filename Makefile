# glmkit: `make lab` opens the kit, `make test` runs every test. Both create .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU/CI pin. GPU users: make lab TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
TORCH  ?= torch==2.13.0
export GLMKIT_CACHE ?= $(CURDIR)/.cache
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test lint tiny notebooks clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	touch $@

$(VENV)/.lab: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[notebooks,server]"
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[notebooks,server,dev]"
	touch $@

tiny: $(VENV)/.lab
	$(BIN)/glmkit make-tiny $(GLMKIT_CACHE)/tiny-glm

lab: tiny
	$(BIN)/jupyter lab $(ALLOW_ROOT) --notebook-dir=notebooks

test: $(VENV)/.dev
	@start=$$(date +%s); \
	$(BIN)/ruff check glmkit tests scripts benchmarks && \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest; status=$$?; \
	echo "make test took $$(( $$(date +%s) - start )) s"; exit $$status

lint: $(VENV)/.dev
	$(BIN)/ruff check glmkit tests scripts benchmarks

# Re-run every notebook and commit it with its outputs (metadata and widget state stripped).
notebooks: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python scripts/run_notebooks.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
