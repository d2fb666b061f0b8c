"""The payload codec: packed-bit masks ``[H, W]``, base64 images, and their SHA-256 digests."""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Sequence

import numpy as np

from worker.protocol.errors import PayloadError


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a boolean mask ``[H, W]`` as packed bits: ``{"shape": [H, W], "bits_b64": str, "sha256": str}``."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise PayloadError(f"mask must be 2-D [H, W], got shape {m.shape}")
    bits = np.packbits(m.astype(bool), axis=None)
    raw = bits.tobytes()
    return {"shape": [int(m.shape[0]), int(m.shape[1])], "bits_b64": base64.b64encode(raw).decode("ascii"),
            "sha256": _mask_digest(raw, int(m.shape[0]), int(m.shape[1]))}


def decode_mask(enc: dict[str, Any]) -> np.ndarray:
    """Decode :func:`encode_mask` output back to a boolean ``[H, W]`` array."""
    try:
        h, w = (int(v) for v in enc["shape"])
        raw = base64.b64decode(enc["bits_b64"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed mask encoding: {exc}") from exc
    if h <= 0 or w <= 0:
        raise PayloadError(f"mask shape must be positive, got {h}x{w}")
    need = (h * w + 7) // 8
    if len(raw) != need:
        raise PayloadError(f"mask bits have {len(raw)} bytes, expected {need} for shape {h}x{w}")
    if "sha256" in enc and enc["sha256"] != _mask_digest(raw, h, w):
        raise PayloadError("mask sha256 does not match its bits and shape")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=h * w).reshape(h, w).astype(bool)


def decode_region_masks(regions: Sequence[Any]) -> tuple[list[np.ndarray], dict[int, str]]:
    """Masks ``[H, W]`` of a payload's regions (``{"id", "mask": EncodedMask}`` each) and the error of each that
    cannot be decoded, by position (its mask is then a ``[1, 1]`` placeholder: one bad region fails alone)."""
    masks, errors = [], {}
    for k, r in enumerate(regions):
        try:
            if not isinstance(r, dict):
                raise PayloadError("region must be an object")
            masks.append(decode_mask(r.get("mask") or {}))
        except PayloadError as exc:
            errors[k] = str(exc)
            masks.append(np.zeros((1, 1), bool))
    return masks, errors


def _mask_digest(raw: bytes, h: int, w: int) -> str:
    return sha256_hex(raw + f"{h}x{w}".encode())


def encode_image(data: bytes) -> dict[str, str]:
    return {"sha256": sha256_hex(data), "data_b64": base64.b64encode(data).decode("ascii")}


def decode_image(enc: dict[str, Any]) -> tuple[bytes, str]:
    """Return ``(image bytes, sha256)``; checks the hash."""
    try:
        data = base64.b64decode(enc["data_b64"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed image encoding: {exc}") from exc
    digest = sha256_hex(data)
    if enc.get("sha256") not in (None, digest):
        raise PayloadError("image sha256 does not match its bytes")
    return data, digest
