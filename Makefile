# Everything a newcomer runs goes through this file. See README.md.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

# CPU torch is 50-200x slower with more than one OpenMP thread on small machines;
# no model hub is reachable in tests.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: demo demo-cluster test test-fast crds lint lock clean

## demo: install the trainer into .venv and run a real local DreamBooth job on the embedded default
demo: $(VENV)/.trainer
	$(BIN)/dreambooth demo

## demo-cluster: the toy-cat example on a simulated cluster: the real operator, trainer, S3
## (SeaweedFS) and Prometheus on kubesim/'s Kubernetes API and controller stand-ins (~1 min)
demo-cluster: $(VENV)/.dev
	@scripts/install-system-tools.sh
	$(BIN)/python -m kubesim.demo

## test: install everything into .venv (and promtool, where apt can) and run the whole test suite
## (tests/ and kubesim/tests/, the simulated cluster's own)
test: $(VENV)/.dev
	@scripts/install-system-tools.sh
	$(BIN)/python -m pytest

## test-fast: the suite without tests marked slow
test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -m "not slow"

## crds: regenerate crds/ and the chart's CRD copy from dreambooth/api, the chart's RBAC rules from dreambooth/operator/rbac.py
crds: $(VENV)/.dev
	$(BIN)/dreambooth crd --write
	$(BIN)/python -m dreambooth.operator.rbac

lint: $(VENV)/.dev
	$(BIN)/ruff check dreambooth tests bench kubesim
	$(BIN)/ruff format --check dreambooth tests bench kubesim
	$(BIN)/lint-imports

## lock: re-pin constraints.txt from what is installed in .venv
lock:
	(head -2 constraints.txt; $(BIN)/pip freeze --all --exclude-editable | grep -v -e '^dreambooth' -e '^pip==' | sed 's/+cpu$$//') > constraints.new && mv constraints.new constraints.txt

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.trainer: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) -e '.[trainer,gallery]'
	touch $@

$(VENV)/.dev: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.trainer

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
