# `make lab`  : set up .venv (first run only) and open JupyterLab on notebooks/
# `make test` : set up .venv (first run only) and run the whole test suite offline
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.course-installed
PORT ?= 8888
# JupyterLab refuses to run as root without this flag (containers, CI).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test notebooks doctor clean-cache

setup: $(STAMP)

# Re-runs only when a pin file or the package metadata changed; a second `make` skips it.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

lab: setup
	HF_HUB_OFFLINE=1 $(BIN)/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(ROOT_FLAG)

test: setup
	HF_HUB_OFFLINE=1 COURSE_PROFILE=ci MPLBACKEND=Agg $(BIN)/python -m pytest $(PYTEST_ARGS)

notebooks: setup
	$(BIN)/python -m course_utils build-exercises

doctor: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m course_utils doctor

clean-cache:
	rm -rf data/cache checkpoints
