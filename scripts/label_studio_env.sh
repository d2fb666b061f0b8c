#!/usr/bin/env bash
# Create (idempotently) the isolated Label Studio virtualenv used by the e2e tests,
# the screenshot script and docs.
#
# Label Studio pins Jinja2/rq/... versions that clash with label-studio-ml 1.0.9, so it
# lives in its own venv and is only ever run as a separate process.
#
# Env:
#   LS_VENV     venv path (default: <repo>/.venv-ls)
#   LS_VERSION  pip requirement for Label Studio (default: label-studio==1.23.2)
#   LS_PYTHON   interpreter that creates the venv (default: python3.11, else python3)
#
# Label Studio 1.23 declares sentry-sdk>=2.16.0 with no upper bound; with sentry-sdk 3.x `label-studio start`
# crashes at import (TypeError: Unknown option 'send_default_pii'), so the install pins it below 3.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LS_VENV:-$repo/.venv-ls}"
req="${LS_VERSION:-label-studio==1.23.2}"
pins="sentry-sdk>=2.16.0,<3"  # what Label Studio 1.23 declares, minus 3.x (see above)
py="${LS_PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$venv/.maskinv-installed"

# Cheap check: importing the package (`label-studio --version` would run DB migrations).
check() { "$venv/bin/python" -c "import label_studio; print(label_studio.__version__)"; }

# An empty migrated SQLite database, copied by the e2e fixtures (migrating takes ~1.5 min on 2 cores).
prepare_db() { MASKINV_LS_VENV="$venv" "$venv/bin/python" "$repo/tests/e2e/ls_harness.py" prepare-db; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$req $pins" ]] && check >/dev/null 2>&1; then
    echo "label_studio_env: $req already in $venv"
    prepare_db
    exit 0
fi

start=$(date +%s)
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
# Hide pip's per-package warnings about absent local index folders; keep real errors.
quiet_pip() { "$venv/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip --upgrade pip wheel
quiet_pip "$req" "$pins"
version="$(check)"
echo "$req $pins" > "$stamp"
echo "label_studio_env: installed label-studio $version into $venv in $(( $(date +%s) - start ))s"
prepare_db
