# FV2ES on Triton. Quick start: `make serve` (one shell), `make test` (another).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REPO ?= model_repository
CHECKPOINT ?=
TEXT_BACKBONE ?=
LABEL_SET ?=
TRANS_HEADS ?=
PREPROCESSING ?=
ENCODERS ?= onnx
GPU_ENCODERS ?= torch
BUILD_OPTIONS = $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(TEXT_BACKBONE),--text-backbone $(TEXT_BACKBONE)) \
	$(if $(LABEL_SET),--label-set $(LABEL_SET)) $(if $(TRANS_HEADS),--trans-heads $(TRANS_HEADS)) \
	$(if $(PREPROCESSING),--preprocessing $(PREPROCESSING))
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002
# Loopback only: ADDRESS=0.0.0.0 exposes the server to the network (README, Security).
ADDRESS ?= 127.0.0.1

.PHONY: setup repository repository-gpu serve test bench clean

# The environment: a venv with the pinned CPU torch, the client and the library.
$(BIN)/.installed: pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	bash scripts/install_system_deps.sh
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e client -e '.[dev,asr,dali]'
	$(BIN)/python -m fv2es.prefetch
	touch $@

setup: $(BIN)/.installed

# The cpu profile of the model repository, from CHECKPOINT (default: untrained seeded weights);
# ENCODERS=int8 quantises the visual and audio encoders (ONNX Runtime dynamic quantisation).
repository: setup
	$(BIN)/python -m builders --profile cpu --encoders $(ENCODERS) --output $(REPO) $(BUILD_OPTIONS)

# The gpu profile (NVIDIA hosts: DALI on NVDEC, torch-CUDA or TensorRT encoders); see README.
repository-gpu: setup
	$(BIN)/python -m builders --profile gpu --encoders $(GPU_ENCODERS) --output $(REPO) $(BUILD_OPTIONS)

serve: setup
	test -f $(REPO)/fv2es/config.pbtxt || $(MAKE) repository
	$(BIN)/python -m fv2es.serving.serve --model-repository $(REPO) --address $(ADDRESS) \
		--grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.compare --quick

clean:
	rm -rf $(REPO)/*/ build .pytest_cache
