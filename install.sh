#!/usr/bin/env bash
# Installs this repository's requirements into the active Python environment, with the right torch:
#   - a torch that is already installed (a GPU box, Kaggle, Colab) is kept, whatever its build;
#   - with an NVIDIA GPU (`nvidia-smi -L` lists one): torch from PyPI, whose Linux wheels are CUDA builds;
#   - otherwise, on Linux: the CPU build of torch (about 200 MB of wheels instead of about 3 GB),
#     from PyTorch's CPU index, or from a local wheel pip already knows of when that index is out of reach.
# Usage: bash install.sh [--dev]     (--dev: also the test requirements)
# Environment: PYTHON (default: python), DRY_RUN=1 prints the pip commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
TORCH_VERSION=2.13.0  # the version the test suite runs on; see requirements.txt
CPU_INDEX=https://download.pytorch.org/whl/cpu
REQS=requirements.txt
[ "${1:-}" = "--dev" ] && REQS=requirements-dev.txt

pip_install() {
    echo "+ $PY -m pip install $*"
    [ -n "${DRY_RUN:-}" ] || "$PY" -m pip install "$@"
}

reachable() {  # host: one TCP connection within 5 s, DNS included
    timeout 5 "$PY" -c "import socket, sys; socket.create_connection((sys.argv[1], 443), timeout=4).close()" "$1" \
        >/dev/null 2>&1
}

if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install.sh: NVIDIA GPU found: torch $TORCH_VERSION from PyPI (CUDA build)"
    pip_install "torch==$TORCH_VERSION"
elif [ "$(uname -s)" != Linux ]; then
    echo "install.sh: $(uname -s): PyPI's torch $TORCH_VERSION (no CUDA build to avoid)"
    pip_install "torch==$TORCH_VERSION"
elif reachable download.pytorch.org; then
    echo "install.sh: no GPU found: the CPU build of torch $TORCH_VERSION"
    pip_install "torch==$TORCH_VERSION+cpu" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
elif pip_install "torch==$TORCH_VERSION+cpu"; then  # a local wheel (a wheel dir or mirror pip is set up for)
    echo "install.sh: no GPU found: the CPU build of torch $TORCH_VERSION"
else
    echo "install.sh: warning: no GPU found, but PyTorch's CPU index ($CPU_INDEX) cannot be reached and no local" \
         "CPU wheel was found; installing PyPI's torch $TORCH_VERSION, the CUDA build (about 3 GB)." >&2
    pip_install "torch==$TORCH_VERSION"
fi
pip_install -r "$REQS"
