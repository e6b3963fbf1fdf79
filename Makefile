# Entry points a new user types: `make demo` and `make test` (both set up .venv first).
VENV ?= .venv
SETUP_FLAGS ?=  # --newest: the newest releases the ranges allow instead of the lock
BIN := $(VENV)/bin
CPU_ENV := OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEMO_VLLM_KWARGS := {"enforce_eager": true, "max_model_len": 4096, "max_num_batched_tokens": 4096}

.PHONY: setup demo test test-newest lock clean

setup:
	VENV=$(VENV) bash scripts/setup.sh $(SETUP_FLAGS)

demo: setup
	$(BIN)/beam-captions tiny-models models
	$(BIN)/beam-captions sample-clips demo-clips
	$(CPU_ENV) $(BIN)/beam-captions --input demo-clips --output out/demo \
	  --generate-captions --generate-previews --model-dir models/captioner \
	  --vllm-kwargs '$(DEMO_VLLM_KWARGS)'

test: setup
	$(CPU_ENV) $(BIN)/python -m pytest -q

# The test suite on the newest releases pyproject.toml's ranges allow, in .venv-newest (the lock is ignored).
test-newest:
	$(MAKE) test VENV=.venv-newest SETUP_FLAGS=--newest

# Resolve locks/cpu.txt and locks/gpu.txt again (UPGRADE=1: every package to its newest release).
lock:
	bash scripts/lock.sh

clean:
	rm -rf out models demo-clips
