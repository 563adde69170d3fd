# glmkit: `make lab` opens the kit, `make test` runs every test. Both create .venv themselves.
# `make test` also needs Debian's chromium (its browser test drives JupyterLab in it): as root it installs it, saying
# so first; otherwise it stops at once with the command to run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU/CI pin. GPU users: make lab TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
TORCH  ?= torch==2.13.0
CHROMIUM := /usr/bin/chromium
# pytest-xdist workers of `make test`: one per core of a 2-core machine (the tests run with OMP_NUM_THREADS=1).
# (--no-loadscope-reorder: pytest-xdist >= 3.8, the dev extra asks for it.)
# Each takes whole files (a notebook's cells stay in one kernel, in order); conftest.py hands out the slowest first.
WORKERS ?= 2
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test lint notebooks clean chromium

# torch comes through pip (it honours pip's configuration: an index or a local file of the CPU build); everything else
# through uv (from PyPI, installed into the venv first), which fetches and installs in parallel: the extras take ~10 s
# instead of pip's ~70 s here, the same versions. uv compiles nothing; compileall -j 0 then writes the .pyc files with
# every core, leaving out folders nothing imports (the packages' own tests, transformers' other ~400 models); a
# module left out still works, compiled when imported. Fresh clone, fresh HOME, 2 cores: `make .venv/.dev` 101-125 -> ~55 s.
COMPILE := $(BIN)/python -m compileall -q -j 0 -x '/tests/|/transformers/models/(?!auto/|glm|encoder_decoder/)' \
	$(VENV)/lib >/dev/null 2>&1 || true
UV := $(BIN)/uv pip install -q --python $(BIN)/python

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)  # its own pip is enough for torch and uv: no upgrade
	$(BIN)/python -m pip install -q --no-compile uv
	$(BIN)/python -m pip install -q --no-compile $(TORCH)
	touch $@

$(VENV)/.lab: $(VENV)/.base
	$(UV) -e ".[notebooks,server]"
	$(COMPILE)
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(UV) -e ".[notebooks,server,dev]"
	$(COMPILE)
	touch $@

# The notebooks use the tiny trained GLM-4 shipped in glmkit/assets (or GLMKIT_MODEL): nothing to build.
lab: $(VENV)/.lab
	$(BIN)/jupyter lab $(ALLOW_ROOT) --notebook-dir=notebooks

chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make test: installing Debian's chromium and the libraries it needs (no recommended extras), for the"; \
	    echo "browser test, which drives JupyterLab in headless Chromium: apt-get install --no-install-recommends chromium"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null || exit 1; \
	  else \
	    echo "make test needs Debian's chromium for its browser test (JupyterLab driven by headless Chromium)."; \
	    echo "Install it, then run make test again:"; \
	    echo "    sudo apt-get install --no-install-recommends chromium"; \
	    exit 1; \
	  fi; \
	fi

test: chromium $(VENV)/.dev
	@start=$$(date +%s); \
	$(BIN)/ruff check glmkit tests scripts benchmarks && \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder; status=$$?; \
	echo "make test took $$(( $$(date +%s) - start )) s"; exit $$status

lint: $(VENV)/.dev
	$(BIN)/ruff check glmkit tests scripts benchmarks

# Re-run every notebook and commit it with its outputs (metadata and widget state stripped).
notebooks: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python scripts/run_notebooks.py

clean:
	rm -rf $(VENV) .cache .pytest_cache test-artifacts
