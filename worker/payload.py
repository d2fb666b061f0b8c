"""Job payload codec shared by the backend and the worker (no torch here).

A job asks the worker to label (and caption) every region of one image. It is a
plain JSON-able dict so that it travels through RQ/Redis unchanged:

    {
      "image": {"sha256": str, "data_b64": str},          # raw encoded image bytes
      "regions": [{"id": str, "mask": EncodedMask}, ...],  # masks in original image pixels
      "labels": [str, ...],                                # open vocabulary (may be empty)
      "params": {...},                                     # see InversionParams
    }

Masks travel as packed bits (``numpy.packbits``), never as JSON lists of pixels:

    EncodedMask = {"shape": [H, W], "bits_b64": str, "sha256": str}
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "an image of a {}.",
)


class PayloadError(ValueError):
    """A job payload or one of its parts is malformed."""


@dataclass(frozen=True)
class InversionParams:
    """Per-request MaskInversion parameters (defaults: the paper's label setting)."""

    steps: int = 10
    lr: float = 0.1
    alpha: float = 0.0
    size: int = 448
    top_k: int = 3
    templates: tuple[str, ...] = field(default=DEFAULT_TEMPLATES)
    caption: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["templates"] = list(self.templates)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "InversionParams":
        if data is not None and not isinstance(data, dict):
            raise PayloadError(f"params must be an object, got {type(data).__name__}")
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PayloadError(f"unknown inversion parameter(s): {sorted(unknown)}")
        if "templates" in data:
            t = data["templates"]
            if not isinstance(t, (list, tuple)) or not t or not all(isinstance(s, str) for s in t):
                raise PayloadError("params.templates must be a non-empty list of strings each containing '{}'")
            data["templates"] = tuple(t)  # each is checked by validate() (worker.prompts.check_template)
        p = cls(**data)
        p.validate()
        return p

    def validate(self) -> None:
        for name in ("steps", "size", "top_k", "lr", "alpha"):
            if isinstance(getattr(self, name), bool):
                raise PayloadError(f"params.{name} must be a number, got a boolean")
        if not isinstance(self.caption, bool):
            raise PayloadError(f"params.caption must be true or false, got {self.caption!r}")
        if not isinstance(self.steps, int) or not 0 <= self.steps <= 1000:
            raise PayloadError(f"params.steps must be an integer in [0, 1000], got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < float(self.lr) <= 10):
            raise PayloadError(f"params.lr must be in (0, 10], got {self.lr!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 <= float(self.alpha) <= 1000):
            raise PayloadError(f"params.alpha must be in [0, 1000], got {self.alpha!r}")
        if not isinstance(self.size, int) or not 32 <= self.size <= 2048:
            raise PayloadError(f"params.size must be an integer in [32, 2048], got {self.size!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 100:
            raise PayloadError(f"params.top_k must be an integer in [1, 100], got {self.top_k!r}")
        from .prompts import check_templates  # one bare '{}' per template, literal braces doubled

        if not isinstance(self.templates, tuple):
            raise PayloadError("params.templates must be a non-empty list of strings each containing '{}'")
        try:
            check_templates(self.templates)
        except PayloadError as exc:
            raise PayloadError(f"params.templates: {exc}") from None


#: Service-wide bounds on K and S that requests may ask for (MASKINV_MAX_STEPS / MASKINV_MAX_SIZE), enforced by the
#: backend on requests and again by the worker on jobs.
DEFAULT_MAX_STEPS = 200
DEFAULT_MAX_SIZE = 1024


def check_limits(params: InversionParams, max_steps: int, max_size: int) -> None:
    """Raise PayloadError when ``params`` asks for more steps or a larger input than the service allows."""
    if params.steps > max_steps:
        raise PayloadError(f"params.steps={params.steps} is more than MASKINV_MAX_STEPS={max_steps}")
    if params.size > max_size:
        raise PayloadError(f"params.size={params.size} is more than MASKINV_MAX_SIZE={max_size}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a boolean mask ``[H, W]`` as packed bits."""
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


def build_job(image_bytes: bytes, regions: list[tuple[str, np.ndarray]], labels: list[str],
              params: InversionParams) -> dict[str, Any]:
    """Assemble a job payload from image bytes and ``(region_id, mask [H, W])`` pairs."""
    return {
        "image": encode_image(image_bytes),
        "regions": [{"id": str(rid), "mask": encode_mask(m)} for rid, m in regions],
        "labels": list(labels),
        "params": params.to_dict(),
    }
