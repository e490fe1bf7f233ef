# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
# Both create ./.venv and install the package with its dependencies on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# panoptica (a test cross-check) pins numpy/pandas below the versions nnU-Net resolves; its own
	# dependencies are in the test extra, so it is installed without letting it downgrade them
	$(BIN)/python -m pip install --quiet --no-deps "panoptica==2.1.7"
	$(BIN)/python -c "import nnunetv2, torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

# everything that does not plan or train with nnU-Net (tests marked e2e are left out)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not e2e" tests

demo: $(STAMP)
	$(BIN)/nnunet-pvs demo $(DEMO_ARGS)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
