#!/usr/bin/env bash
# diffusers and its pure-python dependencies (pinned in requirements-torch.txt) as wheels, for the GPU machine,
# which has torch 2.11 (Python 3.12) but no network.
#
#   here, with network:   scripts/install_wheels.sh download   # -> .whl/ (git-ignored), about 22 MiB
#   on the GPU machine:   scripts/install_wheels.sh            # installs .whl/*.whl into $TILEWISE_SITE
#                         export PYTHONPATH=/tmp/site:$PYTHONPATH   # (default /tmp/site), then checks imports
#
# torch and its dependencies (the first block of requirements-torch.txt) are left out: the GPU image has them.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
SITE=${TILEWISE_SITE:-/tmp/site}

case "${1:-install}" in
  download)
    PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    mkdir -p "$WHL"
    sed -n '/^diffusers==/,$p' requirements-torch.txt | grep -vE '^(#|$)' > "$WHL/pins.txt"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d "$WHL" -r "$WHL/pins.txt"
    echo "$(ls "$WHL"/*.whl | wc -l) wheels, $(du -sh "$WHL" | cut -f1) in $WHL/"
    ;;
  install)
    PY=${PYTHON:-python3}
    ls "$WHL"/*.whl > /dev/null || { echo "no wheels in $WHL/: run 'scripts/install_wheels.sh download' first" >&2; exit 1; }
    "$PY" -m pip install --quiet --no-index --find-links "$WHL" --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHL"/*.whl
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import torch, diffusers
from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel
print("diffusers", diffusers.__version__, "from", diffusers.__file__, "| torch", torch.__version__)'
    echo "installed into $SITE: export PYTHONPATH=$SITE:\$PYTHONPATH"
    ;;
  *)
    echo "usage: scripts/install_wheels.sh [download|install]" >&2
    exit 2
    ;;
esac
