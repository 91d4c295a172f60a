#!/usr/bin/env bash
# Fills .gpu_carry/ in this checkout with what the GPU scripts need on the device machine, where
# only the repository travels (plus carried paths): the Omniglot zips, the preprocessed cache
# (so the 32k PNGs are not decoded there), a copy of the PyTorch peers' scripts and wheels of
# Hydra and OmegaConf (that machine has JAX, Flax, optax and orbax, not Hydra; pure Python, the
# versions installed here). Run it here, in metagrad's virtual environment, then call the device
# tool with carry [".gpu_carry"] (command: experiments/gpu/benchmark.py's docstring). About 22 MB.
#   bash experiments/gpu/prepare.sh [OMNIGLOT_DIR] [PEERS_DIR]
# Defaults: ../shared/data/omniglot and ../shared/peers next to the checkout.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data="${1:-$repo/../shared/data/omniglot}"
peers="${2:-$repo/../shared/peers}"
carry="$repo/.gpu_carry"
for f in "$data/images_background.zip" "$data/images_evaluation.zip" "$peers/bench_sinusoid.py"; do
  [ -f "$f" ] || { echo "prepare.sh: missing $f" >&2; exit 1; }
done
# .gitignore lists .gpu_carry/, so it travels only when carried (and never gets committed).
mkdir -p "$carry/omniglot" "$carry/cache" "$carry/peers"
cp -f "$data"/images_background.zip "$data"/images_evaluation.zip "$carry/omniglot/"
cp -f "$peers"/bench_sinusoid.py "$peers"/bench_omniglot_conv4.py "$carry/peers/"
# The loader's cache is keyed by the zips' bytes: copy this machine's (each .npz with the .sha256
# that vouches for it, or the loader rebuilds it), else write it (slow).
cache="${METAGRAD_CACHE:-$HOME/.cache/metagrad}/omniglot"
mkdir -p "$carry/cache/omniglot"
cp "$cache"/omniglot28_*.npz "$cache"/omniglot28_*.npz.sha256 "$carry/cache/omniglot/" 2>/dev/null || true
(cd "$repo" && python -c "
import sys
from metagrad.tasks.omniglot import load_omniglot
load_omniglot(sys.argv[1], cache_dir=sys.argv[2])
" "$carry/omniglot" "$carry/cache")
# pip wheel builds antlr4-python3-runtime, which PyPI ships as source only.
versions=$(python -c "
from importlib.metadata import version
print(' '.join(f'{n}=={version(n)}' for n in ('hydra-core', 'omegaconf', 'antlr4-python3-runtime')))")
rm -rf "$carry/wheels"
python -m pip wheel -q --no-deps -w "$carry/wheels" $versions
du -sh "$carry"
git -C "$repo" status --short --ignored "$carry" | head -3
