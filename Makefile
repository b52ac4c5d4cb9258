# Two commands for a fresh machine (see README.md):
#   make run    set up .venv if needed, then run the main job on the embedded offline benchmark
#   make test   set up .venv if needed, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run train-tiny test lint bench

setup:
	bash scripts/setup.sh

run: setup
	$(PY) tune/search.py

train-tiny: setup
	$(PY) train/train_net.py --config-file configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml

test: setup
	$(PY) -m pytest -q --durations=40

lint: setup
	$(VENV)/bin/ruff check eqlv2 train tune tests benchmarks scripts

bench: setup
	$(PY) benchmarks/loss_overhead.py
	$(PY) benchmarks/eval_speed.py
	$(PY) benchmarks/ray_overhead.py
