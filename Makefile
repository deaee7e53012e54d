# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo venv clean

venv: $(STAMP)

# torch is pinned exactly in requirements.txt, so pip never takes an older local CPU wheel
# (torchvision cannot import against it). The same file is what the Dockerfile installs.
$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Synthetic data -> short DINO-SSLight run (GPU if present, else CPU) -> kNN vs random init, img/s.
demo: $(STAMP)
	$(PY) -m sslight_dali.cli demo

clean:
	rm -rf $(VENV) runs/demo runs/demo.old-* data/demo data/synth
