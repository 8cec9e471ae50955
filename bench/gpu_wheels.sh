#!/usr/bin/env bash
# The wheels bench/gpu_check.py --no-ray needs that the device machines' image lacks (it has
# torch, torchvision, timm, numpy, pillow, scipy, scikit-image, tifffile, pyarrow, fsspec,
# pyyaml; no network there), for its Python 3.12 on manylinux x86_64, at requirements.txt's pins:
#     bash bench/gpu_wheels.sh            # → build/gpu-wheels/*.whl (32.5 MB; git-ignored)
# Why each: pydantic (+ pydantic-core, annotated-types, typing-inspection, a typing-extensions
# new enough for them) for hipt_ray.config; imagecodecs for JPEG tiles (tifffile writing the
# demo slides, the CPU decoder); openslide-python + openslide-bin because hipt_ray.slides.reader
# imports openslide; simplejpeg for DCT-scaled reads (reader.scaled_decode). On the device:
#     python3 -m pip install --no-index --no-deps --target /tmp/w build/gpu-wheels/*.whl
#     PYTHONPATH=/tmp/w:. python3 bench/gpu_check.py --no-ray --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
[[ -x "$PIP" ]] || PIP="python3 -m pip"
DEST=build/gpu-wheels
PKGS=(pydantic pydantic_core annotated-types typing-inspection typing_extensions imagecodecs
      openslide-python openslide-bin simplejpeg)
pins=()
for p in "${PKGS[@]}"; do
    line=$(grep -i -E "^${p//[-_]/[-_]}==" requirements.txt) || { echo "gpu_wheels: $p is not pinned in requirements.txt" >&2; exit 1; }
    pins+=("${line%% *}")
done
mkdir -p "$DEST"
$PIP download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DEST" "${pins[@]}"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $total bytes in $DEST (a run carries ≤ 64 MiB = 67108864)"
(( total <= 67108864 )) || { echo "gpu_wheels: over 64 MiB" >&2; exit 1; }
