#!/usr/bin/env bash
# Set up fmnist on a fresh machine: system packages (Debian, when run as root), a virtual environment in .venv,
# PyTorch 2.13.0 (CPU build) and the package itself. `--dev` adds what the tests need (headless Chromium, PostgreSQL,
# test tools, Optuna).
# Safe to run again: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY=${PYTHON:-python3}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    pkgs="dataset-fashion-mnist"
    # postgresql: the tests of `fmnist tune` start a throwaway cluster with its initdb and pg_ctl
    [ "$DEV" = 1 ] && pkgs="$pkgs chromium chromium-driver fonts-dejavu-core fonts-liberation adwaita-icon-theme postgresql"
    missing=""
    for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    if [ -n "$missing" ]; then
        echo "setup: apt-get install$missing"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
else
    echo "setup: not root or no apt-get: the data will be downloaded on first use (see README)"
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# Pin torch first and on its own: an unpinned torch requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
    || $PIP install -q "torch==2.13.0"
extras="serve,report"
[ "$DEV" = 1 ] && extras="$extras,ood,export,test,tune,postgres,tensorboard"
$PIP install -q -e ".[$extras]"
echo "setup: ready ($(.venv/bin/python -c 'import torch, fmnist; print("fmnist", fmnist.__version__, "torch", torch.__version__)'))"
