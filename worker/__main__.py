"""``python -m worker``: start an RQ worker that loads the model once and keeps its caches across jobs."""

from __future__ import annotations

import sys

from worker.queue_worker import main

if __name__ == "__main__":
    sys.exit(main())
