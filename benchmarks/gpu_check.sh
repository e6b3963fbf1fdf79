#!/usr/bin/env bash
# The GPU benchmark in one command (P4b and P6 under 8 minutes on one GPU; P8 adds five engine starts): install the GPU build of vLLM (make setup picks
# it when nvidia-smi sees a GPU), build the tiny models, then P4b (pipeline vs vLLM's continuous-batching
# ceiling), P6 (the whole job vs raw vLLM, GPU busy fraction, peak GPU memory) and P8 (every caption family
# through the job, the tiny Omni in its real MoE layout included, which vLLM's CPU build cannot run). Without a GPU it runs the
# same code on the CPU path. Results: benchmarks/results/latest.json; the card's name is in each figure.
# A GPU machine with no network (this workplace's device machines) cannot run `make setup`: carry the
# wheels instead (benchmarks/README.md, "GPU run"; the list is benchmarks/gpu_offline_wheels.txt) and run the
# last line with PYTHONPATH pointing at them and VLLM_USE_FLASHINFER_SAMPLER=0.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi -L 2>/dev/null || echo "gpu_check: no GPU visible; running the CPU path"
make setup
.venv/bin/python benchmarks/run.py --quick --only P4B,P6,P8
