# Entry points a new user types: `make demo` and `make test` (both set up .venv first).
VENV ?= .venv
BIN := $(VENV)/bin
CPU_ENV := OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEMO_VLLM_KWARGS := {"enforce_eager": true, "max_model_len": 4096, "max_num_batched_tokens": 4096}

.PHONY: setup demo test clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(BIN)/beam-captions tiny-models models
	$(BIN)/beam-captions sample-clips demo-clips
	$(CPU_ENV) $(BIN)/beam-captions --input demo-clips --output out/demo \
	  --generate-captions --generate-previews --model-dir models/captioner \
	  --vllm-kwargs '$(DEMO_VLLM_KWARGS)'

test: setup
	$(CPU_ENV) $(BIN)/python -m pytest -q

clean:
	rm -rf out models demo-clips
