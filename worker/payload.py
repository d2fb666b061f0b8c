"""Job payload codec (no torch here): the worker-side names of what :mod:`worker.protocol` defines.

The codec itself (:class:`InversionParams`, packed-bit masks, base64 images, the ``label_regions`` payload) lives in
:mod:`worker.protocol`, the one module of ``worker`` the backend imports; this module keeps the names the worker
and its tests have always used, and :func:`build_job`.

    EncodedMask = {"shape": [H, W], "bits_b64": str, "sha256": str}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .protocol import (DEFAULT_MAX_SIZE, DEFAULT_MAX_STEPS, DEFAULT_TEMPLATES, InversionParams, LabelRegionsJob,
                       PayloadError, check_limits, decode_image, decode_mask, encode_image, encode_mask, sha256_hex)

__all__ = ["DEFAULT_MAX_SIZE", "DEFAULT_MAX_STEPS", "DEFAULT_TEMPLATES", "InversionParams", "PayloadError",
           "build_job", "check_limits", "decode_image", "decode_mask", "encode_image", "encode_mask", "sha256_hex"]


def build_job(image_bytes: bytes, regions: list[tuple[str, np.ndarray]], labels: list[str],
              params: InversionParams) -> dict[str, Any]:
    """A ``label_regions`` payload (wire dict) from image bytes and ``(region_id, mask [H, W])`` pairs."""
    return LabelRegionsJob.build(image_bytes, regions, labels, params).to_dict()
