#!/usr/bin/env bash
# Set up .venv (idempotent) and start the ML backend (gunicorn) on $MASKINV_PORT (default 9090).
# Embedded mode by default: without REDIS_URL the jobs run in this process, no Redis or worker needed.
#   bash scripts/run.sh                                   # ViT-B-16/openai (needs its weights: hub or cache)
#   MASKINV_PRETRAINED=/models/vit-b-16.pt bash scripts/run.sh   # offline: a local checkpoint
#   REDIS_URL=redis://127.0.0.1:6379/0 bash scripts/run.sh       # queue mode (start workers: .venv/bin/maskinv-worker)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
# install the project only when it is missing (a start must not reinstall it: minutes, and the network)
installed() {  # the project and its worker + backend extras, found without importing them (no torch import)
  .venv/bin/python - <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util as iu, sys
md.distribution("maskinversion-labelstudio")
mods = ("open_clip", "transformers", "skimage", "label_studio_ml", "label_studio_sdk", "gunicorn", "cv2", "rq")
sys.exit(any(iu.find_spec(m) is None for m in mods))
PY
}
if [ ! -x .venv/bin/maskinv-backend ] || ! installed; then
  .venv/bin/pip install -q -e '.[worker,backend]'
fi
exec .venv/bin/maskinv-backend "$@"
