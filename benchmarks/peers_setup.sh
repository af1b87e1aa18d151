#!/usr/bin/env bash
# Install the peer libraries for benchmarks/compare_peers.py into their OWN virtual
# environment, so influx's environment stays clean.
#
#   bash benchmarks/peers_setup.sh          # -> $PEER_VENV (default: <repo>/.peer-venv)
#
# Pins (resolved by pip on Python 3.11, 2026-11):
#   torch 2.13.0 CPU build: the machine keeps torch-2.13.0+cpu for Python 3.11 in pip's
#     find-links; asking for plain `torch` (or a range a newer release satisfies) would
#     pull a multi-GB CUDA build instead, so torch is installed first and pinned again
#     with the peers.
#   pydvl[influence] 0.10.0 (latest), kronfluence 1.0.1 (latest), numpy 1.26.4 (pyDVL caps
#     numpy < 2), scikit-learn 1.9.1.
#   kronfluence declares torchvision, and pip resolves torchvision 0.28.0 from PyPI, which
#     does not import beside the local torch build ("operator torchvision::nms does not
#     exist"). Neither peer imports torchvision, so it is uninstalled afterwards.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEER_VENV="${PEER_VENV:-$ROOT/.peer-venv}"
PY="${PEER_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
start=$(date +%s)

TORCH=torch==2.13.0
PINS=("pydvl[influence]==0.10.0" "kronfluence==1.0.1" "numpy==1.26.4" "scikit-learn==1.9.1")

if [ ! -x "$PEER_VENV/bin/python" ]; then
  "$PY" -m venv "$PEER_VENV"
fi
PIP=("$PEER_VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "$TORCH" 2>&1 | grep -v "^WARNING: Location" || true
"${PIP[@]}" install "$TORCH" "${PINS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
if ! "$PEER_VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  "${PIP[@]}" uninstall -y torchvision >/dev/null 2>&1 || true
fi

"$PEER_VENV/bin/python" -W ignore - <<'PYEOF'
import torch, numpy, sklearn, pydvl, kronfluence
from pydvl.influence.torch import (ArnoldiInfluence, CgInfluence, DirectInfluence,
                                   EkfacInfluence, LissaInfluence)
from kronfluence.analyzer import Analyzer, prepare_model
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
print(f"peer venv ok: torch {torch.__version__}, pydvl {pydvl.__version__}, "
      f"kronfluence {kronfluence.__version__}, numpy {numpy.__version__}, "
      f"scikit-learn {sklearn.__version__}")
PYEOF
echo "peer venv: $PEER_VENV ($(( $(date +%s) - start )) s)"
