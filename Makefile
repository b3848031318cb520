# Two entry points for a new machine:
#   make demo   install everything into .venv, then run a real local mesh with real jobs
#   make test   install everything into .venv, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel first: on these machines it is a local file; a bare `torch`
	# requirement would pull several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,lint]'
	# The dashboard's browser test drives Debian's chromium headless; it skips without it.
	if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y --no-install-recommends chromium >/dev/null \
			|| echo "chromium not installed: the dashboard browser test will be skipped"; \
	fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nexusd demo --failover

test: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check nexusd mesh atoms tests bench scripts
	$(BIN)/ruff format --check nexusd mesh atoms tests bench scripts
	# libp2p pins trio-typing, whose stale trio-stubs shadow trio's own inline types;
	# MYPYPATH is searched first, so point it at the real trio package.
	mkdir -p .mypy_path && ln -sfn "$$($(BIN)/python -c 'import os, trio; print(os.path.dirname(trio.__file__))')" .mypy_path/trio
	MYPYPATH=.mypy_path $(BIN)/mypy nexusd mesh atoms

bench: $(STAMP)
	$(BIN)/python -m bench.all

clean:
	rm -rf $(VENV) build *.egg-info
