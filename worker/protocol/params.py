"""Per-request inversion parameters (:class:`InversionParams`), their defaults and the service's bounds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from worker.protocol.errors import PayloadError
from worker.protocol.vocabulary import check_templates

# ---------------------------------------------------------------------------------------------- payload codec
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

#: Service-wide bounds on K and S that requests may ask for (MASKINV_MAX_STEPS / MASKINV_MAX_SIZE), enforced by the
#: backend on requests and again by the worker on jobs.
DEFAULT_MAX_STEPS = 200
DEFAULT_MAX_SIZE = 1024


#: allowed values of ``InversionParams.views``
VIEWS = (1, 2)
#: largest ``InversionParams.crop_weight`` (beyond it the LET barely counts)
MAX_CROP_WEIGHT = 10.0
#: the service's default ``crop_weight`` (``MASKINV_CROP_WEIGHT``): chosen on the scene world's val split
#: (weights 0 .. 1.0, zero-shot; ``benchmarks/results/region_classification_scene_world_val.md``)
DEFAULT_CROP_WEIGHT = 0.3


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
    #: views a region is embedded from: 1 = the image; 2 = also its horizontal mirror (image and mask flipped),
    #: the region's embedding then being the mean direction of the two LETs (see ``worker.jobs.embed``)
    views: int = 1
    #: weight of the region's masked-crop embedding in its embedding (0: the LET alone); the region's embedding is
    #: then the direction of unit(LET) + crop_weight x unit(masked crop), at the LET's norm (``worker.jobs.embed``)
    crop_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["templates"] = list(self.templates)
        if self.views == 1:  # the default stays implicit: a worker that predates views reads the payload unchanged
            del d["views"]
        if not self.crop_weight:  # likewise
            del d["crop_weight"]
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
            data["templates"] = tuple(t)  # each is checked by validate() (check_templates)
        p = cls(**data)
        p.validate()
        return p

    def validate(self) -> None:
        for name in ("steps", "size", "top_k", "lr", "alpha", "views", "crop_weight"):
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
        if not isinstance(self.views, int) or self.views not in VIEWS:
            raise PayloadError(f"params.views must be one of {list(VIEWS)}, got {self.views!r}")
        if not (isinstance(self.crop_weight, (int, float)) and 0 <= float(self.crop_weight) <= MAX_CROP_WEIGHT):
            raise PayloadError(f"params.crop_weight must be in [0, {MAX_CROP_WEIGHT:g}], got {self.crop_weight!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 100:
            raise PayloadError(f"params.top_k must be an integer in [1, 100], got {self.top_k!r}")
        if not isinstance(self.templates, tuple):
            raise PayloadError("params.templates must be a non-empty list of strings each containing '{}'")
        try:
            check_templates(self.templates)
        except PayloadError as exc:
            raise PayloadError(f"params.templates: {exc}") from None


def check_limits(params: InversionParams, max_steps: int, max_size: int) -> None:
    """Raise PayloadError when ``params`` asks for more steps or a larger input than the service allows."""
    if params.steps > max_steps:
        raise PayloadError(f"params.steps={params.steps} is more than MASKINV_MAX_STEPS={max_steps}")
    if params.size > max_size:
        raise PayloadError(f"params.size={params.size} is more than MASKINV_MAX_SIZE={max_size}")
