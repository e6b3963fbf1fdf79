#!/usr/bin/env bash
# Start a Beam Python worker pool on this host, for Flink jobs run with --environment_type=EXTERNAL.
#
#   templates/flink/start_worker_pool.sh [--venv DIR] [--port 50000] [--gpus 0]
#
# Every Flink TaskManager on this host asks the pool for SDK workers (the job's
# --environment_config=localhost:PORT), and the pool starts each one as `python -c ...SdkHarness...`
# with the pool's own environment. Hence:
#   * the venv's bin comes first on PATH: that `python` must have beam-captions, vLLM and exactly the
#     Beam version of the machine that submits the job (default venv: .venv of this checkout);
#   * --gpus (or an inherited CUDA_VISIBLE_DEVICES) decides which GPUs the SDK workers, and so their vLLM
#     engines, see; without either, all of the host's GPUs are visible;
#   * vLLM logs to stderr: the pool pipes each worker's stdout and never reads it, so a worker that
#     writes much to stdout would block once the pipe is full;
#   * models load from local directories, never from the Hub (HF_HUB_OFFLINE=1 unless already set).
# It runs in the foreground (use systemd or supervisord to keep it up) until stopped.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PORT=${PORT:-50000}
GPUS=${GPUS:-}

die() { echo "start_worker_pool.sh: $*" >&2; exit 2; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --venv) [ "$#" -ge 2 ] || die "--venv needs a directory"; VENV=$2; shift 2 ;;
    --port) [ "$#" -ge 2 ] || die "--port needs a number"; PORT=$2; shift 2 ;;
    --gpus) [ "$#" -ge 2 ] || die "--gpus needs a list like 0 or 0,1"; GPUS=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
done

case "$PORT" in ''|*[!0-9]*) die "--port must be a number (got '$PORT')" ;; esac
case "$GPUS" in *[!0-9,]*) die "--gpus must be GPU indices like 0 or 0,1 (got '$GPUS')" ;; esac
[ -x "$VENV/bin/python" ] || die "no Python at $VENV/bin/python (pass --venv)"

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
if [ -n "$GPUS" ]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
export VLLM_LOGGING_STREAM=ext://sys.stderr
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"

# Fail here, not in the first job, when the venv lacks a piece.
python -c 'import apache_beam, beam_captions, vllm, sys; print(
    f"worker pool: python {sys.version.split()[0]}, apache-beam {apache_beam.__version__}, "
    f"beam-captions {beam_captions.__version__}, vllm {vllm.__version__}", file=sys.stderr)'
echo "worker pool: port $PORT, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<all>}" >&2

exec python -m apache_beam.runners.worker.worker_pool_main --service_port="$PORT"
