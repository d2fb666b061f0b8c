#!/usr/bin/env bash
# Create (idempotently) the virtualenv holding the public MaskInversion package, for
# benchmarks/bench_vs_official.py: PyPI maskinversion-torch 1.1 over legrad-torch 1.1 on open_clip <= 2.23,
# with the same torch as the project (so both sides run the same kernels).
#
# Env:
#   OFFICIAL_VENV    venv path (default: <repo>/.venv-official)
#   OFFICIAL_PYTHON  interpreter that creates the venv (default: python3.11, else python3)
#   OFFICIAL_TORCH   torch requirement (default: the project's venv torch version)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${OFFICIAL_VENV:-$repo/.venv-official}"
py="${OFFICIAL_PYTHON:-$(command -v python3.11 || command -v python3)}"
torch_req="${OFFICIAL_TORCH:-torch==$("$repo/.venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')}"
req=("maskinversion-torch==1.1" "legrad-torch==1.1" "open_clip_torch<=2.23.0" "$torch_req")
stamp="$venv/.maskinv-installed"

check() { "$venv/bin/python" -W ignore -c "import maskinversion, legrad, open_clip, torch; from importlib.metadata import version; print(version(\"open_clip_torch\"), torch.__version__)"; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "${req[*]}" ]] && check >/dev/null 2>&1; then
    echo "official_env: ${req[*]} already in $venv"
    exit 0
fi
start=$(date +%s)
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
quiet_pip() { "$venv/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip --upgrade pip wheel
quiet_pip "${req[@]}"
versions="$(check)"
echo "${req[*]}" > "$stamp"
echo "official_env: installed (open_clip, torch) $versions into $venv in $(( $(date +%s) - start ))s"
