# Everything runs inside .venv, created on first use with the exact versions of requirements/lock.txt
# (pip constraints), so `make demo` and `make test` install what was tested, on any day.
# `make test-latest` / `make test-floor` run the suite against the newest / the lowest versions that
# pyproject.toml's ranges allow, each in a virtual environment of its own; `make lock` re-locks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LATEST := .venv-latest
FLOOR := .venv-floor
DATA := data/shapes
RUN := runs/tiny

.PHONY: demo demo-dense demo-upcycle evaluate test test-latest test-floor lock bench venv data clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Newest releases in range, upgraded on every call: how an upstream rename is caught before a user meets it.
test-latest:
	test -d $(LATEST) || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	@echo "Newer releases this run does not test (held back by a pip constraint or another package's pin):"
	@$(LATEST)/bin/python -m pip list --outdated --exclude-editable 2>/dev/null | grep -v -E '^(nvidia-|cuda-)' || true
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

# Lower bounds of the pure-Python dependencies; torch and torchvision stay at the lock's build.
test-floor: $(STAMP)
	test -d $(FLOOR) || $(PYTHON) -m venv $(FLOOR)
	$(PY) requirements/floor.py pyproject.toml $(LOCK) > $(FLOOR)/constraints.txt
	$(FLOOR)/bin/python -m pip install --quiet -c $(LOCK) --upgrade pip
	$(FLOOR)/bin/python -m pip install --quiet -c $(FLOOR)/constraints.txt -e '.[dev]'
	$(FLOOR)/bin/python -m pytest -q -p no:cacheprovider

# Re-lock: the suite on the newest versions in range, then their exact versions become the lock.
lock: test-latest
	{ echo "# pip constraints: the versions the suite passed on (make lock, $$(date -u +%F), Python $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())'))"; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK)

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

$(DATA)/index.json: | $(STAMP)
	$(PY) data_scripts/make_shapes.py --output $(DATA) --num-val 500 --num-test 500

data: $(DATA)/index.json

# The main job: data, training, evaluation on the test split, the vision probe, a few captions,
# and the summary beside the dense baseline's figures (docs/results/demo-dense: `make demo-dense`).
demo: $(STAMP) $(DATA)/index.json
	$(PY) train.py --config configs/tiny.yaml train.overwrite=true
	$(MAKE) evaluate RUN=$(RUN)
	$(PY) -m vlmoe.caption --checkpoint $(RUN)/final $(DATA)/images
	$(PY) -m vlmoe.evaluation.summary $(RUN)/final docs/results/demo-dense
	@echo "routing pictures: $(RUN)/final/eval_*/routing_load.png, routing_patches.png"

# The dense baseline trained the same way; its figures are kept in docs/results/demo-dense.
demo-dense: $(STAMP) $(DATA)/index.json
	$(PY) train.py --config configs/tiny-dense.yaml train.overwrite=true
	$(MAKE) evaluate RUN=runs/tiny-dense
	mkdir -p docs/results/demo-dense
	cd runs/tiny-dense/final && cp --parents eval_vqa/metrics.json eval_caption/metrics.json probe.json \
		$(CURDIR)/docs/results/demo-dense/

# The demo's MoE layers upcycled from the trained dense baseline (configs/tiny-upcycle.yaml), trained
# for a third of the steps; the dense baseline is trained first when runs/tiny-dense/final is missing.
# Both are evaluated on the test split and printed side by side.
demo-upcycle: $(STAMP) $(DATA)/index.json
	test -f runs/tiny-dense/final/config.json || $(PY) train.py --config configs/tiny-dense.yaml train.overwrite=true
	test -f runs/tiny-dense/final/eval_caption/metrics.json || $(MAKE) evaluate RUN=runs/tiny-dense
	$(PY) train.py --config configs/tiny-upcycle.yaml train.overwrite=true
	$(MAKE) evaluate RUN=runs/tiny-upcycle
	$(PY) -m vlmoe.evaluation.summary runs/tiny-upcycle/final runs/tiny-dense/final

# Test-split evaluation and the vision probe of $(RUN)/final.
evaluate: $(STAMP)
	$(PY) eval.py --checkpoint $(RUN)/final --data "$(DATA)/vqa/test-*.tar" --task vqa --max-new-tokens 4
	$(PY) eval.py --checkpoint $(RUN)/final --data "$(DATA)/caption/test-*.tar" --task caption --max-new-tokens 20
	$(PY) -m vlmoe.evaluation.probe --checkpoint $(RUN)/final --train "$(DATA)/caption/train-*.tar" \
		--test "$(DATA)/caption/test-*.tar" --output $(RUN)/final/probe.json

clean:
	rm -rf $(VENV) $(LATEST) $(FLOOR)
