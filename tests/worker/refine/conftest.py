"""The refinement tests' tiny random SAM checkpoint (no SAM weights here)."""

from __future__ import annotations

import pytest
from refine_support import save_tiny_sam


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    return save_tiny_sam(tmp_path_factory.mktemp("tiny-sam"))
