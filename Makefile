# `make train` and `make test` install what is missing into .venv, then run.
# TORCH_SPEC picks the torch build installed when .venv has none. torch==2.13.0 resolves to the
# CPU wheel on machines that ship it locally (pip find-links) and to the normal PyPI build elsewhere;
# override with e.g. `make TORCH_SPEC=torch test`. An already-installed torch is kept and pinned.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= mujoco,box2d,sb3,supervised,dist,video,minatar,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
ARGS ?=

.PHONY: install train test test-all lint bench-fisher

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(PIP) install -q -c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	case ",$(EXTRAS)," in *,dev,*) $(PIP) install -q --no-deps "curvlinops-for-pytorch>=3" "backpack-for-pytorch>=1.6";; esac
	touch $(STAMP)

train: $(STAMP)
	$(PY) scripts/train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench-fisher: $(STAMP)
	$(PY) scripts/bench_fisher.py $(ARGS)
