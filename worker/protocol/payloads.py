"""Job payloads, one class per job kind, each with ``to_dict`` / ``from_dict`` (validating; PayloadError names the
field): :class:`LabelRegionsJob`, :class:`EmbedRegionsJob`, :class:`ProposeRegionsJob`, :class:`PrepareLabelsJob`.

A payload carries ``"v"`` (:data:`~worker.protocol.errors.PROTOCOL_VERSION`); a worker refuses a newer major
version with a clear error, and reads a payload without ``"v"`` as version 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from worker.protocol.codec import encode_image, encode_mask
from worker.protocol.errors import PROTOCOL_VERSION, PayloadError, check_payload_version
from worker.protocol.params import DEFAULT_TEMPLATES, InversionParams
from worker.protocol.prompts import RegionPrompt, prompt_region
from worker.protocol.prototypes import ExamplePrototypes
from worker.protocol.vocabulary import MAX_EMBED_LABELS, check_labels

# ---------------------------------------------------------------------------------------------- job payloads
def region_ids(regions: Sequence[Any]) -> list[str]:
    """Each region's id as sent (its position when it has none, or when the region is not an object)."""
    return [str(r.get("id", k)) if isinstance(r, dict) else str(k) for k, r in enumerate(regions)]


def _job_version(data: Any) -> int:
    """The protocol version of a job payload, after checking that it is an object."""
    if not isinstance(data, dict):
        raise PayloadError(f"job must be a dict, got {type(data).__name__}")
    return check_payload_version(data)


def _with_prototypes(out: dict[str, Any], prototypes: ExamplePrototypes | None) -> dict[str, Any]:
    if prototypes is not None:
        out["prototypes"] = prototypes.to_dict()
    return out


def _with_embedding(out: dict[str, Any], embedding: bool) -> dict[str, Any]:
    if embedding:
        out["embedding"] = True
    return out


def _embedding_flag(data: Mapping[str, Any]) -> bool:
    """A payload's ``embedding`` flag (absent: false); PayloadError for anything but a boolean."""
    flag = data.get("embedding", False)
    if not isinstance(flag, bool):
        raise PayloadError(f"embedding must be true or false, got {flag!r}")
    return flag


def _regions_list(data: Mapping[str, Any]) -> tuple[Any, ...]:
    regions = data.get("regions") if data.get("regions") is not None else []
    if not isinstance(regions, list):
        raise PayloadError("regions must be a list")
    return tuple(regions)


def _image_object(data: Mapping[str, Any]) -> Mapping[str, Any]:
    image = data.get("image") if data.get("image") is not None else {}
    if not isinstance(image, dict):
        raise PayloadError(f"image must be an object, got {type(image).__name__}")
    return image


@dataclass(frozen=True)
class LabelRegionsJob:
    """Payload of a ``label_regions`` job: every region of one image, one vocabulary, one set of parameters.

    Wire format (``to_dict``; version 1 is the first format plus ``"v"``, which older workers ignore)::

        {"v": 1, "image": {"sha256": str, "data_b64": str},
         "regions": [{"id": str, "mask": {"shape": [H, W], "bits_b64": str, "sha256": str},
                      "prompt": {"box": [x0, y0, x1, y1]} | {"points": [[x, y], ...]},   # optional
                      "refine": bool}, ...],                                             # optional, false
         "labels": [str, ...], "params": InversionParams.to_dict(),
         "prototypes": ExamplePrototypes.to_dict(),   # optional: the project's example prototypes
         "embedding": true}                           # optional: return each region's embedding

    A region's ``prompt`` and ``refine`` (:mod:`worker.protocol.prompts`, caps there): with ``refine`` the worker
    turns the prompt into an object mask, inverts on it and returns it in the region's ``meta["mask"]`` with
    ``meta["refined_by"]``.
    ``regions`` are kept as sent (``from_dict`` does not decode masks: a bad mask or prompt fails only its region);
    ``prototypes`` is checked as far as a document shows (:meth:`ExamplePrototypes.from_dict`), its vectors by
    the worker that scores with them. With ``embedding`` (sent by a backend with a region index) each region's
    result carries the vector its labels were scored on (``RegionResult.embedding``); a payload without the key
    asks for none.
    """

    image: Mapping[str, Any]
    regions: tuple[Mapping[str, Any], ...]
    labels: tuple[str, ...] = ()
    params: InversionParams = field(default_factory=InversionParams)
    v: int = PROTOCOL_VERSION
    prototypes: ExamplePrototypes | None = None
    embedding: bool = False

    kind = "label_regions"

    @classmethod
    def build(cls, image_bytes: bytes, regions: Iterable[tuple[str, np.ndarray | Mapping[str, Any]]],
              labels: Sequence[str], params: InversionParams,
              prototypes: ExamplePrototypes | Mapping[str, Any] | None = None,
              prompts: Mapping[str, tuple[RegionPrompt, bool]] | None = None,
              embedding: bool = False) -> "LabelRegionsJob":
        """From image bytes and ``(region_id, mask [H, W] or encoded mask)`` pairs; ``prompts`` maps a region id
        to its ``(prompt, refine)``."""
        prompts = prompts or {}
        return cls(image=encode_image(image_bytes),
                   regions=tuple(prompt_region(str(rid), m if isinstance(m, Mapping) else encode_mask(m),
                                               *prompts.get(str(rid), (None, False)))
                                 for rid, m in regions),
                   labels=tuple(labels), params=params, prototypes=ExamplePrototypes.optional(prototypes),
                   embedding=embedding)

    def to_dict(self) -> dict[str, Any]:
        out = {"v": self.v, "image": dict(self.image), "regions": [dict(r) for r in self.regions],
               "labels": list(self.labels), "params": self.params.to_dict()}
        return _with_embedding(_with_prototypes(out, self.prototypes), self.embedding)

    @classmethod
    def from_dict(cls, data: Any) -> "LabelRegionsJob":
        """Validate a payload (version, params, labels, image, regions list); PayloadError names the field."""
        v = _job_version(data)
        params = InversionParams.from_dict(data.get("params"))
        labels = check_labels(data.get("labels"))
        image = _image_object(data)
        regions = data.get("regions")
        if not isinstance(regions, list):
            raise PayloadError("regions must be a list")
        prototypes = ExamplePrototypes.optional(data.get("prototypes"))
        return cls(image=image, regions=tuple(regions), labels=tuple(labels), params=params, v=v,
                   prototypes=prototypes, embedding=_embedding_flag(data))

    def region_ids(self) -> list[str]:
        """Each region's id (its position when it has none)."""
        return region_ids(self.regions)


#: vector encodings an ``embed_regions`` job may ask for (:func:`encode_vectors`)
EMBED_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class EmbedRegionsJob:
    """Payload of an ``embed_regions`` job: the LETs of regions of one image (a project's examples) and, optionally,
    the text prototypes of a label set (``regions`` may then be empty and ``image`` absent)::

        {"v": 1, "image": {"sha256", "data_b64"}, "regions": [{"id": str, "mask": EncodedMask}, ...],
         "params": InversionParams.to_dict(), "labels": [str, ...], "dtype": "float16" | "float32"}

    Caps: :data:`MAX_EMBED_LABELS` labels; regions are kept as sent (a bad mask fails only its region).
    """

    regions: tuple[Mapping[str, Any], ...] = ()
    image: Mapping[str, Any] | None = None
    params: InversionParams = field(default_factory=InversionParams)
    labels: tuple[str, ...] = ()
    dtype: str = "float16"
    v: int = PROTOCOL_VERSION

    kind = "embed_regions"

    @classmethod
    def build(cls, image_bytes: bytes | None, regions: Iterable[tuple[str, np.ndarray]], params: InversionParams,
              labels: Sequence[str] = (), dtype: str = "float16") -> "EmbedRegionsJob":
        """From image bytes (None for text prototypes only) and ``(region_id, mask [H, W])`` pairs."""
        return cls(regions=tuple({"id": str(rid), "mask": encode_mask(m)} for rid, m in regions),
                   image=encode_image(image_bytes) if image_bytes is not None else None, params=params,
                   labels=tuple(labels), dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        out = {"v": self.v, "regions": [dict(r) for r in self.regions], "params": self.params.to_dict(),
               "dtype": self.dtype}
        if self.image is not None:
            out["image"] = dict(self.image)
        if self.labels:
            out["labels"] = list(self.labels)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "EmbedRegionsJob":
        """Validate a payload (version, params, labels, dtype, image, regions list); PayloadError names the field."""
        v = _job_version(data)
        regions = _regions_list(data)
        params = InversionParams.from_dict(data.get("params"))
        labels = data.get("labels") or []
        if (not isinstance(labels, list) or len(labels) > MAX_EMBED_LABELS
                or not all(isinstance(x, str) and x.strip() for x in labels)):
            raise PayloadError(f"labels must be a list of at most {MAX_EMBED_LABELS} non-empty strings")
        dtype = data.get("dtype", "float16")
        if dtype not in EMBED_DTYPES:
            raise PayloadError(f"dtype must be float16 or float32, got {dtype!r}")
        image = _image_object(data) if regions else None
        return cls(regions=regions, image=image, params=params, labels=tuple(labels), dtype=dtype, v=v)

    def region_ids(self) -> list[str]:
        """Each region's id (its position when it has none)."""
        return region_ids(self.regions)


@dataclass(frozen=True)
class ProposeRegionsJob:
    """Payload of a ``propose_regions`` job: propose, label and caption regions nobody drew on one image::

        {"v": 1, "image": {"sha256", "data_b64"}, "labels": [str, ...], "params": InversionParams.to_dict(),
         "proposals": {"sources": [str, ...], "max_proposals": int, "min_score": float, "refine": bool},
         "prototypes": ExamplePrototypes.to_dict(),   # optional, as in LabelRegionsJob
         "embedding": true}                           # optional, as in LabelRegionsJob

    ``proposals`` (every key optional) is checked by the worker against its own settings
    (``worker.jobs.propose.ProposalOptions``: which sources it has, its cap on proposals).
    """

    image: Mapping[str, Any]
    labels: tuple[str, ...]
    params: InversionParams = field(default_factory=InversionParams)
    proposals: Mapping[str, Any] = field(default_factory=dict)
    v: int = PROTOCOL_VERSION
    prototypes: ExamplePrototypes | None = None
    embedding: bool = False

    kind = "propose_regions"

    @classmethod
    def build(cls, image_bytes: bytes, labels: Sequence[str], params: InversionParams,
              proposals: Mapping[str, Any] | None = None,
              prototypes: ExamplePrototypes | Mapping[str, Any] | None = None,
              embedding: bool = False) -> "ProposeRegionsJob":
        return cls(image=encode_image(image_bytes), labels=tuple(labels), params=params,
                   proposals=dict(proposals or {}),
                   prototypes=ExamplePrototypes.optional(prototypes), embedding=embedding)

    def to_dict(self) -> dict[str, Any]:
        out = {"v": self.v, "image": dict(self.image), "labels": list(self.labels), "params": self.params.to_dict(),
               "proposals": dict(self.proposals)}
        return _with_embedding(_with_prototypes(out, self.prototypes), self.embedding)

    @classmethod
    def from_dict(cls, data: Any) -> "ProposeRegionsJob":
        """Validate a payload (version, params, labels: non-empty and unique, image, proposals object)."""
        v = _job_version(data)
        params = InversionParams.from_dict(data.get("params"))
        labels = check_labels(data.get("labels"))
        if not labels:
            raise PayloadError("labels must be a non-empty list of non-empty strings")
        proposals = data.get("proposals")
        if proposals is not None and not isinstance(proposals, dict):
            raise PayloadError(f"proposals must be an object, got {type(proposals).__name__}")
        prototypes = ExamplePrototypes.optional(data.get("prototypes"))
        return cls(image=_image_object(data), labels=tuple(labels), params=params, proposals=dict(proposals or {}),
                   v=v, prototypes=prototypes, embedding=_embedding_flag(data))


#: most label sets (region controls) and labels in all one ``prepare_labels`` job may name
MAX_PREPARE_LABEL_SETS = 64
MAX_PREPARE_LABELS = 10_000


@dataclass(frozen=True)
class PrepareLabelsJob:
    """Payload of a ``prepare_labels`` job (sent when Label Studio calls ``/setup``): warm the worker's caches of
    text prototypes (and retrieval-caption phrases when ``captions``) for a project's label sets::

        {"v": 1, "kind": "prepare_labels", "label_sets": [[str, ...], ...], "templates": [str, ...],
         "captions": bool}

    Caps: :data:`MAX_PREPARE_LABEL_SETS` sets, :data:`MAX_PREPARE_LABELS` labels in all.
    """

    label_sets: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    captions: bool = True
    v: int = PROTOCOL_VERSION

    kind = "prepare_labels"

    def to_dict(self) -> dict[str, Any]:
        return {"v": self.v, "kind": self.kind, "label_sets": [list(s) for s in self.label_sets],
                "templates": list(self.templates), "captions": self.captions}

    @classmethod
    def from_dict(cls, data: Any) -> "PrepareLabelsJob":
        v = _job_version(data)
        sets = data.get("label_sets")
        if not isinstance(sets, list) or len(sets) > MAX_PREPARE_LABEL_SETS:
            raise PayloadError(f"label_sets must be a list of at most {MAX_PREPARE_LABEL_SETS} label lists")
        label_sets = tuple(tuple(check_labels(s)) for s in sets)
        if sum(len(s) for s in label_sets) > MAX_PREPARE_LABELS:
            raise PayloadError(f"label_sets hold more than {MAX_PREPARE_LABELS} labels")
        templates = InversionParams.from_dict({"templates": data.get("templates") or list(DEFAULT_TEMPLATES)})
        captions = data.get("captions", True)
        if not isinstance(captions, bool):
            raise PayloadError(f"captions must be true or false, got {captions!r}")
        return cls(label_sets=label_sets, templates=templates.templates, captions=captions, v=v)


def payload_region_ids(payload: Any) -> list[str]:
    """Region ids of a payload that may be malformed (for a rejection result naming every region)."""
    regions = payload.get("regions") if isinstance(payload, dict) else None
    return [str(r.get("id")) for r in regions if isinstance(r, dict)] if isinstance(regions, list) else []
