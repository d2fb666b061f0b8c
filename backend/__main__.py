"""``python -m backend``: same as ``maskinv-backend``."""

from __future__ import annotations

import sys

from backend.http.serve import main

if __name__ == "__main__":
    sys.exit(main())
