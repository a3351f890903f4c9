# omnilab — `make help` lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.13.0
CUDA ?=
EXP ?= ccmp/tiny
ARGS ?=
WITH ?=
CKPT ?=
CLUSTER ?=
NODES ?= 1
GPUS ?= 8
HOURS ?= 24
PARTITION ?=
ACCOUNT ?=
MEM ?=
DRY ?=
METRIC ?=
PY := $(VENV)/bin/python
OMNILAB := $(VENV)/bin/omnilab
STAMP := $(VENV)/.omnilab-installed

ifeq ($(CUDA),1)
TORCH := 2.10.0
EXTRAS := dev,cuda
else
EXTRAS := dev
endif

# experiments/_base/default.yaml + fragments named in WITH (e.g. WITH=bf16,ddp) + the experiment
comma := ,
CONFIGS := --config experiments/_base/default.yaml $(foreach f,$(subst $(comma), ,$(WITH)),--config experiments/_base/$(f).yaml) --config experiments/$(EXP).yaml
# CKPT: a checkpoint, a run folder, or `latest` (the default: the latest run of EXP, runs/EXP/latest);
# the CLI picks best.ckpt (else last.ckpt) to evaluate, last.ckpt to resume, and prints the one it uses
CKPT_PATH := $(if $(CKPT),$(CKPT),latest)

.PHONY: help install train resume eval predict data test test-full bench mlflow-ui compare lint format clean

help: ## list the targets
	@echo "usage: make <target> [EXP=method/name] [ARGS='--trainer.max_steps=10'] [WITH=bf16,ddp]"
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-11s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required (PYTHON=$(PYTHON))"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP) ## create .venv, install torch (TORCH=2.13.0) and the suite; CUDA=1: torch 2.10 + xformers

train: install ## fit then test an experiment: EXP=ccmp/tiny [ARGS=...] [WITH=bf16,ddp] [CLUSTER=slurm NODES= GPUS= PARTITION= ACCOUNT= MEM= [DRY=1]]
ifeq ($(CLUSTER),slurm)
	$(OMNILAB) slurm --nodes $(NODES) --gpus $(GPUS) --hours $(HOURS) $(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(MEM),--mem $(MEM)) $(if $(DRY),--dry-run) -- fit $(CONFIGS) $(ARGS)
else
	$(OMNILAB) fit $(CONFIGS) $(ARGS)
endif

resume: install ## continue a fit where it stopped, in its run folder and MLflow run: EXP= [CKPT=run folder or checkpoint; default latest]
	$(OMNILAB) fit $(CONFIGS) --ckpt_path $(CKPT_PATH) $(ARGS)

eval: install ## Lightning test of a run, written into its folder: EXP= [CKPT=latest (default), a run folder or checkpoint; none: the config's own weights]
	$(OMNILAB) test $(CONFIGS) $(if $(filter none,$(CKPT)),,--ckpt_path $(CKPT_PATH)) $(ARGS)

predict: install ## Lightning predict with a run's checkpoint, into its predictions/: EXP= [CKPT=latest]
	$(OMNILAB) predict $(CONFIGS) --ckpt_path $(CKPT_PATH) $(ARGS)

data: install ## generate every embedded shard set under data/
	@for kind in $$($(OMNILAB) data list | sed -n 's/^synth: //p' | tr ',' ' '); do \
		test -f data/$$kind/index.json || $(OMNILAB) data synth $$kind || exit 1; done

test: install ## the fast test suite (< 10 min on 2 CPU cores)
	$(PY) -m pytest -q

test-full: install ## everything, including slow tests (multi-process DDP, mini-replications)
	$(PY) -m pytest -q -m "slow or not slow"

bench: install ## speed/memory benchmarks and mini-replications (figures go to benchmarks/RESULTS.md)
	$(OMNILAB) bench

mlflow-ui: install ## serve the MLflow dashboard on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlruns/mlflow.db} --host 127.0.0.1 --port 5000

compare: install ## table + curves of a method's runs: EXP=ccmp [METRIC=val/iou]
	$(OMNILAB) compare --experiment $(firstword $(subst /, ,$(EXP))) $(if $(METRIC),--metric $(METRIC))

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install ## ruff fix and format
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean: ## remove runs/, data/, mlruns/ and caches (keeps .venv)
	rm -rf runs data mlruns lightning_logs .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
