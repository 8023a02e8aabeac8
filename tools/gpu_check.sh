#!/usr/bin/env bash
# One-call device check on a single-GPU machine with torch but no network (the project's GPU image).
#
#   bash tools/gpu_check.sh [OUT_DIR] [--budget-s S] [--iters N] [--warmup W]
#
# OUT_DIR defaults to $OUT (the device tool's output folder), else ./gpu_check_out.
# What it does:
# - Refuses at once, one line and exit status 2, where torch sees no CUDA GPU (or there is no torch).
# - Installs what the image lacks (megatron-core 0.19.2, omegaconf, psutil, pytest, ...: tools/gpu_wheels.txt) from
#   the wheels in tools/gpu_wheels/ (make them with `bash tools/fetch_gpu_wheels.sh` where the registry is
#   reachable, and carry that git-ignored folder with the working tree) into a private folder
#   (pip --target, --no-index --no-deps): the image's own packages are left alone. Stops with one line if a
#   wheel is missing.
# - Runs, within --budget-s seconds (default 480 = 8 minutes), `python -m megatron_muon.bench.gpu_check`:
#   pytest tests/gpu; a bf16 world-1 training of a ~1B proxy of launch/configs/moe_1b_8gpu.yaml (TP1·EP1, local
#   spec: no Transformer Engine) with Muon and with AdamW (tokens/s, MFU, peak memory, optimizer share of the
#   step, device->host syncs per step); the Newton–Schulz GPU bench.
# - Writes OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json (device name, versions, every stage). Exit status 0
#   when every stage passed, 1 when one failed or ran out of time.
#
# Environment: PYTHON (default: python3), GPU_WHEELS (default: tools/gpu_wheels).
set -uo pipefail

name=gpu_check.sh
fail() { echo "$name: error: $*" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="" passthrough=()
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) sed -n '/^# One-call/,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --budget-s | --iters | --warmup)
      [ $# -ge 2 ] || fail "$1 needs a value"
      passthrough+=("$1" "$2"); shift 2 ;;
    -*) fail "unknown option '$1' (usage: $name [OUT_DIR] [--budget-s S] [--iters N] [--warmup W])" ;;
    *) [ -z "$out" ] || fail "unexpected argument '$1': one OUT_DIR only"; out=$1; shift ;;
  esac
done
out=${out:-${OUT:-gpu_check_out}}
python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || fail "no Python at '$python' (set PYTHON)"

# The refusal comes first: nothing is installed on a machine that cannot run the check.
reason=$("$python" - <<'PY' 2>&1
try:
    import torch
except ImportError as error:
    print(f"torch is not importable ({error})")
else:
    if not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False)")
PY
)
[ -z "$reason" ] || fail "$reason; run it on the GPU machine"

wheels=${GPU_WHEELS:-$repo/tools/gpu_wheels}
mapfile -t wanted < <(sed -n 's/^\([A-Za-z0-9_.-]*\)==\(.*\)$/\1 \2/p' "$repo/tools/gpu_wheels.txt")
files=()
for entry in "${wanted[@]}"; do
  read -r package version <<<"$entry"
  stem=$(echo "$package" | tr 'A-Z-' 'a-z_')
  match=$(find "$wheels" -maxdepth 1 -iname "${stem}-${version}-*.whl" 2>/dev/null | head -n 1)
  [ -n "$match" ] || fail "no wheel for $package==$version in $wheels (make them with: bash tools/fetch_gpu_wheels.sh)"
  files+=("$match")
done
site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
trap 'rm -rf "$site"' EXIT
"$python" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$site" "${files[@]}" ||
  fail "pip could not install the wheels of $wheels into $site"
echo "$name: installed ${#files[@]} wheels into $site"

mkdir -p "$out" || fail "cannot create $out"
cd "$repo" || exit 2
PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}" "$python" -m megatron_muon.bench.gpu_check --out "$out" "${passthrough[@]}"
