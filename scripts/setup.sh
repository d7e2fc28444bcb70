#!/usr/bin/env bash
# Install satori and everything it needs into ./.venv, from nothing but Python >= 3.10.
# On a CPU-only machine torch==2.13.0 is installed first: a plain `torch` requirement would
# pull a multi-GB CUDA build (see ../shared/DESIGN.md). Set SATORI_TORCH to choose another
# torch requirement (e.g. SATORI_TORCH="torch" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q "${SATORI_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# headless Chromium for the report test (Debian packages), when we can install system packages
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "setup: could not install chromium; the report rendering test needs it" >&2
fi
.venv/bin/python -c "import torch, transformers, accelerate, math_verify, satori; print('satori', satori.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
