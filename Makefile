# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo venv lock clean

venv: $(STAMP)

# requirements.txt pins what we use directly; constraints.txt pins the whole installed set (pip
# included), so every fresh machine gets the same packages. The Dockerfile installs the same pins.
$(STAMP): requirements.txt constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip -c constraints.txt
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Synthetic data -> short DINO-SSLight run (GPU if present, else CPU) -> kNN vs random init, img/s.
demo: $(STAMP)
	$(PY) -m sslight_dali.cli demo

# Re-pin the whole set after changing requirements.txt: a fresh venv gets requirements.txt alone (each
# package at its pin, the rest at what pip resolves today) and is frozen whole into constraints.txt.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -r requirements.txt
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/python -m pip freeze --all --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) runs/demo runs/demo.old-* data/demo data/synth
