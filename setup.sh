#!/usr/bin/env bash
# Set up diffsolve for development in ./.venv (or in the virtualenv that is already active).
# PyTorch: an existing torch is used as it is; only when none is installed does this install
# the CPU build (torch 2.13.0, which these machines keep on disk). On other machines, install
# the torch build you want first and this script will leave it alone.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
if ! python -c "import torch" >/dev/null 2>&1; then
    pip install --quiet "torch==2.13.0"
fi
pip install --quiet -e ".[dev]"
python -c "import diffsolve, torch; print('diffsolve', diffsolve.__version__, '| torch', torch.__version__)"
