#!/usr/bin/env bash
# Create the project's virtual environment with a Python >= 3.12 found on this machine and install
# megatron-muon with its test extras. Idempotent: re-running only re-installs what changed.
#
#   bash launch/setup.sh            # -> .venv/ in the repository root
#   VENV=/path/to/env PYTHON=/usr/bin/python3.12 bash launch/setup.sh
#   INSTALLER=pip bash launch/setup.sh   # pip alone (the default installer is uv, see below)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
extras=${EXTRAS:-dev}

python_ok() {  # $1: an interpreter; true if it runs and is >= 3.12
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      command -v "$candidate"; return 0
    fi
  done
  # pyenv keeps interpreters under its root; its shims refuse versions that are not selected, so call the
  # binaries directly (newest first).
  local root
  root=$( (command -v pyenv >/dev/null 2>&1 && pyenv root) || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  for candidate in $(ls -d "$root"/versions/3.* 2>/dev/null | sort -V -r); do
    if [ -x "$candidate/bin/python3" ] && python_ok "$candidate/bin/python3"; then
      echo "$candidate/bin/python3"; return 0
    fi
  done
  return 1
}

if [ -x "$venv/bin/python" ] && python_ok "$venv/bin/python"; then
  echo "setup: using existing environment $venv"
else
  if ! python=$(find_python); then
    echo "setup: no Python >= 3.12 found (tried \$PYTHON, python3.13, python3.12, python3 and pyenv versions); install one or set PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  echo "setup: creating $venv with $python ($("$python" --version 2>&1))"
  "$python" -m venv "$venv"
fi

"$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true

# The installer: uv by default. torch's CUDA build brings ~6 GB of packages (nvidia-*, triton); pip unpacks and
# compiles them one by one (~3 minutes on 2 cores with nothing cached), uv in parallel (~80 s, bytecode
# included). uv comes from PATH or is installed into the environment with pip; INSTALLER=pip uses pip alone. uv
# reads no pip configuration, so pip's configured constraint file (a machine-wide cap on torch, say) is passed on.
installer=${INSTALLER:-uv}
case "$installer" in uv|pip) ;; *) echo "setup: INSTALLER=$installer is not valid: use uv or pip" >&2; exit 2 ;; esac
pip_install() {  # $@: what to install, with pip
  # The editable build's setuptools notice (BuildBackendWarning: "be careful with folders ... same name as your
  # package") is about developing setuptools layouts, not something a user acts on: warnings off for the build.
  PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
uv_install() {  # $@: what to install, with uv
  local uv constraint
  uv=$(command -v uv || true)
  if [ -z "$uv" ]; then
    pip_install uv || return 1
    uv=$venv/bin/uv
  fi
  # pip's configured constraint (`pip config get` refuses a key set in a system-wide file: read the listing)
  constraint=${PIP_CONSTRAINT:-$("$venv/bin/python" -m pip config list 2>/dev/null |
    sed -n "s/^\(global\|install\)\.constraint='\(.*\)'\$/\2/p" | tr '\n' ' ')}
  UV_CONSTRAINT=${UV_CONSTRAINT:-$constraint} PYTHONWARNINGS=ignore \
    "$uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" "$@"
}
echo "setup: installing megatron-muon[$extras] (megatron-core 0.19.2, torch, ...) with $installer; the first time takes a few minutes"
if [ "$installer" = uv ]; then
  if ! uv_install -e "$repo[$extras]"; then
    echo "setup: uv could not install the environment (its error is above); installing with pip instead" >&2
    pip_install -e "$repo[$extras]"
  fi
else
  pip_install -e "$repo[$extras]"
fi
"$venv/bin/python" -W ignore - <<'PY'
import logging
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU machines
import megatron.core, torch, megatron_muon
release = megatron.core.__version__.split("+")[0]
print(f"setup: ok: torch {torch.__version__}, megatron-core {release}, megatron-muon {megatron_muon.__version__}")
PY
