"""Import label-studio-ml without torch.

``label_studio_ml.model`` (1.0.9) does ``import torch.multiprocessing`` when torch is installed (and then
switches multiprocessing to "spawn" globally). The backend must not load torch in queue mode, so the
import is done with torch masked; afterwards torch stays importable (embedded mode imports it lazily).
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_label_studio_ml() -> tuple[ModuleType, ModuleType]:
    """Return ``(label_studio_ml.api, label_studio_ml.model)`` imported without torch."""
    if "label_studio_ml.model" in sys.modules and "label_studio_ml.api" in sys.modules:
        return sys.modules["label_studio_ml.api"], sys.modules["label_studio_ml.model"]
    masked = "torch" not in sys.modules
    if masked:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch...` raise ImportError
    try:
        import label_studio_ml.api as api
        import label_studio_ml.model as model
    finally:
        if masked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return api, model
