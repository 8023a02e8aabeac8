#!/usr/bin/env bash
# Download the wheels tools/gpu_check.sh installs on the GPU image (listed, pinned, in tools/gpu_wheels.txt) into
# tools/gpu_wheels/, for CPython 3.12 on manylinux x86_64, without their dependencies (the image has them).
#
#   bash tools/fetch_gpu_wheels.sh            # needs the registry; ~4.5 MiB
#
# tools/gpu_wheels/ is git-ignored: hand it to the GPU machine with the working tree (the device tool's `carry`).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
dest=$repo/tools/gpu_wheels
mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -r "$repo/tools/gpu_wheels.txt"
du -sh "$dest"
