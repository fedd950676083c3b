# Two commands on a fresh machine:
#   make demo   the whole pipeline on a tiny bundled subset, offline, on CPU
#   make test   the test suite (what CI runs)
#   make test-fast   the suite without the tests marked slow (the inner loop, under 3 minutes)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-ui test test-fast install bench clean image-cpu image-cuda

$(BIN)/muse: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch from local disk first; the package only asks for a range.
	$(BIN)/pip install -q torch==2.13.0
	NO_ALBUMENTATIONS_UPDATE=1 $(BIN)/pip install -q -e '.[dev]'
	# img2dataset pulls the py3.6 `dataclasses` backport; Prefect's local server puts
	# site-packages first on sys.path, where that file then shadows the stdlib module.
	$(BIN)/pip uninstall -y -q dataclasses
	touch $(BIN)/muse

install: $(BIN)/muse

demo: install
	$(BIN)/python -m flows.demo --output demo-output

# the demo on a local Prefect server + workers + deployments, to click through the UI (Ctrl-C stops it)
demo-ui: install
	$(BIN)/python -m flows.demo_ui --output demo-ui-output

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The work pools' images (docs/flows.md); IMAGE=<registry>/muse-pipeline to tag for a push.
IMAGE ?= muse-pipeline
image-cpu:
	docker build -f docker/Dockerfile -t $(IMAGE):cpu .

image-cuda:
	docker build -f docker/Dockerfile --build-arg TORCH=cu128 -t $(IMAGE):cuda .

bench: install
	bash bench/all.sh

clean:
	rm -rf demo-output demo-ui-output muse-data
