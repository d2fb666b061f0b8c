"""Vectors on the wire (``[N, D]`` as base64 float32/float16) and the numpy helpers of the prototype vectors."""

from __future__ import annotations

import base64

import numpy as np


# ---------------------------------------------------------------------------------------------- vectors
def encode_vectors(x: np.ndarray, dtype: str = "float32") -> dict:
    """``[N, D]`` -> ``{"dtype", "shape", "data": base64 of the little-endian array}`` (dtype float32 or float16)."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    arr = np.ascontiguousarray(np.asarray(x, dtype="<f4" if dtype == "float32" else "<f2"))
    if arr.ndim != 2:
        raise ValueError(f"expected a [N, D] array, got shape {arr.shape}")
    return {"dtype": dtype, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_vectors(doc: dict, max_bytes: int = 64 << 20) -> np.ndarray:
    """Inverse of :func:`encode_vectors` -> float32 ``[N, D]``; ValueError on a malformed document."""
    if not isinstance(doc, dict):
        raise ValueError("vectors must be an object {dtype, shape, data}")
    dtype, shape, data = doc.get("dtype"), doc.get("shape"), doc.get("data")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"vectors.dtype must be float32 or float16, got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ValueError(f"vectors.shape must be [N, D] with non-negative integers, got {shape!r}")
    if not isinstance(data, str) or len(data) > max_bytes * 4 // 3 + 4:
        raise ValueError("vectors.data must be a base64 string within the size limit")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise ValueError("vectors.data is not valid base64") from None
    item = 4 if dtype == "float32" else 2
    if len(raw) != shape[0] * shape[1] * item:
        need = shape[0] * shape[1] * item
        raise ValueError(f"vectors.data has {len(raw)} bytes, expected {need} for {shape} {dtype}")
    arr = np.frombuffer(raw, dtype="<f4" if dtype == "float32" else "<f2").reshape(shape).astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("vectors contain non-finite values")
    return arr


# numpy helpers of the prototype vectors (fitted by backend.learning.fit, scored by worker.text.prototypes)
def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ``[N, D]`` scaled to unit length (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def log_softmax_rows(z: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis of ``z`` ``[N, L]``."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

