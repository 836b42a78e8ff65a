# MergeLab developer commands.  `make test` sets up everything it needs on a fresh machine.
PYTHON ?= python3
VENV_PY := .venv/bin/python

.PHONY: test setup unit demo bench clean-env

setup:
	$(PYTHON) -m mergelab.setup_env
	bash tests/browser/setup.sh

test: setup
	$(VENV_PY) -m pytest --durations=25 $(PYTEST_ARGS)

unit: setup
	$(VENV_PY) -m pytest tests/unit $(PYTEST_ARGS)

# the main job: DARE-TIES merge of two checkpoints, then their difference LoRA (see mergelab/demo.py);
# DEMO_ARGS="--small" or DEMO_ARGS="--models DIR --a A.safetensors --b B.safetensors"
demo: setup
	$(VENV_PY) -m mergelab.demo $(DEMO_ARGS)

clean-env:
	rm -rf .venv .cache
