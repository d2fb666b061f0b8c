"""``maskinv-rebuild-examples``: rebuild projects' examples from their annotations in Label Studio.

Label Studio's annotations are the source of truth; the example store (SQLite under ``MASKINV_DATA_DIR`` in
embedded mode, Redis at ``REDIS_URL`` in queue mode) can always be rebuilt from them. Uses the backend's own
settings (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, model and inversion variables): in embedded mode the
model runs in this process, in queue mode the embedding jobs go to the running workers.

    maskinv-rebuild-examples 3 7          # projects 3 and 7
    maskinv-rebuild-examples --wipe 3     # clear project 3's examples first
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="maskinv-rebuild-examples", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("projects", nargs="+", help="Label Studio project ids")
    ap.add_argument("--wipe", action="store_true", help="delete the projects' stored examples before rebuilding")
    a = ap.parse_args(argv)
    from backend.learning.learner import LearningError, project_id
    from backend.service import Service
    from backend.settings import Settings, SettingsError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = Settings.from_env()
        ids = [project_id(p) for p in a.projects]
    except (SettingsError, LearningError) as exc:
        print(f"maskinv-rebuild-examples: {exc}", file=sys.stderr)
        return 2
    service = Service(settings)
    learner = service.learner
    status = 0
    for pid in ids:
        try:
            if a.wipe:
                learner.store.clear(pid)
            print(json.dumps(learner.rebuild(pid).to_dict()))
        except Exception as exc:  # noqa: BLE001 - report per project and go on
            print(f"project {pid}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
