# Two commands for users: `make demo` and `make test`. Both create .venv when it is
# missing or incomplete and reuse it otherwise (TensorFlow is large; never reinstall it
# needlessly).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.instance_embed-installed
DATA_DIR ?= data
DEMO_DIR ?= runs/demo

.PHONY: venv demo test test-slow test-all bench clean-venv

# The stamp is rebuilt when setup.py changes; `check_venv` catches a venv whose
# packages were removed or whose install was interrupted.
$(STAMP): setup.py
	@if [ ! -x $(PY) ]; then echo "Creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

venv:
	@if [ -f $(STAMP) ] && ! $(PY) -c "import tensorflow, tensorflow_datasets, keras, skimage, pycocotools, instance_embed" >/dev/null 2>&1; then \
		echo "$(VENV) is incomplete: reinstalling"; rm -f $(STAMP); fi
	@$(MAKE) --no-print-directory $(STAMP)

demo: venv
	$(PY) -m instance_embed.demo --data_dir=$(DATA_DIR) --model_dir=$(DEMO_DIR)

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

test-all: venv
	$(PY) -m pytest -q -m "slow or not slow"

bench: venv
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
