# Everything runs inside .venv, created on first use (torch/torchvision first: pip resolves the
# pinned builds from the local wheel cache on the dev machines; elsewhere from PyPI).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DATA := data/shapes
RUN := runs/tiny

.PHONY: demo test bench venv data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

$(DATA)/index.json: | $(STAMP)
	$(PY) data_scripts/make_shapes.py --output $(DATA) --num-val 500 --num-test 500

data: $(DATA)/index.json

# The main job: data, training, evaluation on the test split, routing pictures, a few captions.
demo: $(STAMP) $(DATA)/index.json
	$(PY) train.py --config configs/tiny.yaml
	$(PY) eval.py --checkpoint $(RUN)/final --data "$(DATA)/vqa/test-*.tar" --task vqa --max-new-tokens 4
	$(PY) eval.py --checkpoint $(RUN)/final --data "$(DATA)/caption/test-*.tar" --task caption --max-new-tokens 20
	$(PY) -m vlmoe.caption --checkpoint $(RUN)/final $(DATA)/images
	$(PY) -m vlmoe.evaluation.summary $(RUN)/final/eval_vqa $(RUN)/final/eval_caption
	@echo "routing pictures: $(RUN)/final/eval_*/routing_load.png, routing_patches.png"

clean:
	rm -rf $(VENV)
