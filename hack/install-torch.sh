#!/usr/bin/env bash
# Installs torch (a few GB: the CUDA build from PyPI) once into a version-keyed cache outside the
# repository, and links it into the virtualenv given as $1 with a .pth file. Later venvs reuse it.
set -euo pipefail
venv="${1:?usage: install-torch.sh VENV}"
TORCH_VERSION=2.15.0
NUMPY_VERSION=2.4.6
python="$venv/bin/python"
tag=$("$python" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
cache="${LARGO_TORCH_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/largo/torch}/torch-$TORCH_VERSION-numpy-$NUMPY_VERSION-$tag"
if [ ! -d "$cache" ]; then
  echo "[install-torch] installing torch $TORCH_VERSION into $cache (a few GB, once)" >&2
  rm -rf "$cache.tmp"
  # torch's own dependencies (sympy, networkx, the CUDA libraries...) at the versions pinned beside it.
  "$venv/bin/pip" install --quiet --disable-pip-version-check --target "$cache.tmp" \
    -c "$(dirname "$0")/../operator/constraints.txt" "torch==$TORCH_VERSION" "numpy==$NUMPY_VERSION"
  mv "$cache.tmp" "$cache"
fi
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$cache" > "$site/largo-torch.pth"
"$python" -c 'import torch; print("[install-torch] torch", torch.__version__, "ready", flush=True)' >&2
