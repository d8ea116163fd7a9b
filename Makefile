# largo: `make demo` runs the main job on the local cluster, `make test` runs every test.
# Both set up what they need (venv, Python packages, the Kubernetes tools) and cache it.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What the venv is made from: a new pin in either file makes it again.
VENV_STAMP := $(VENV)/.installed-$(shell cat operator/pyproject.toml operator/constraints.txt hack/install-torch.sh | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# The chart's operator image defaults to its appVersion: `make images` tags that too.
APP_VERSION := $(shell sed -n 's/^appVersion: *"*\([^"]*\)"*$$/\1/p' charts/largo/Chart.yaml)

.PHONY: all venv tools test unit integration lint format crds dashboard verify demo images clean constraints

all: test

venv: $(VENV_STAMP)

$(VENV_STAMP): operator/pyproject.toml operator/constraints.txt hack/install-torch.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check 'pip==25.3'
	$(BIN)/pip install --quiet --disable-pip-version-check -c operator/constraints.txt -e 'operator[dev]'
	./hack/install-torch.sh $(VENV)
	rm -f $(VENV)/.installed-* && touch $@

tools:
	./hack/build-tools.sh >/dev/null

# After a pin changes in pyproject.toml or install-torch.sh: make the venv from scratch, then this.
constraints: venv
	{ sed -n '1,2p' operator/constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^largo=='; } > operator/constraints.txt.new
	mv operator/constraints.txt.new operator/constraints.txt

# Three groups of suites that share nothing run side by side: localnode, kwok cluster, processes.
test: venv tools
	$(BIN)/python hack/test-suites.py $(PYTEST_ARGS)

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: venv tools
	$(BIN)/pytest tests/integration tests/e2e $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check --config operator/pyproject.toml operator tests bench
	$(BIN)/ruff format --config operator/pyproject.toml --check operator tests bench
	cd operator && ../$(BIN)/mypy src ../bench

format: venv
	$(BIN)/ruff check --config operator/pyproject.toml --fix operator tests bench
	$(BIN)/ruff format --config operator/pyproject.toml operator tests bench

crds: venv
	$(BIN)/python -m largo.api.crd --out crds --chart charts/largo

dashboard: venv
	$(BIN)/python -m largo.dev.dashboard

verify: venv
	$(BIN)/python -m largo.api.crd --out crds --chart charts/largo --check
	$(BIN)/python -m largo.dev.dashboard --check

demo: venv tools
	VENV=$(VENV) ./hack/demo.sh $(ARGS)

images:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make images needs a running container engine (docker)"; exit 1; }
	docker build -f images/operator/Dockerfile -t largo-operator:dev -t largo-operator:$(APP_VERSION) .
	docker build -f images/trainer/Dockerfile -t largo-trainer:dev .
	docker build -f images/router/Dockerfile -t largo-router:dev .

clean:
	rm -rf $(VENV)
