"""What the backend needs from a project's label config, read with label-studio-sdk's ``LabelInterface``.

* region controls: ``BrushLabels``, ``PolygonLabels``, ``RectangleLabels`` (their ``<Label>`` values are the
  open vocabulary) and the plain tools ``Brush``, ``Polygon``, ``Rectangle``. A plain tool takes its
  vocabulary from a generic ``<Labels>`` control on the same image if there is one (predictions are then
  written as that control's merged ``<tool>labels`` result), else from ``MASKINV_LABELS``;
* prompt controls: a ``Rectangle(Labels)`` or ``KeyPoint(Labels)`` with ``smartOnly="true"`` on an image that also
  has a ``PolygonLabels`` / ``BrushLabels`` (or plain ``Polygon`` / ``Brush``) control. Label Studio 1.23 has no
  smart polygon tool, so a box or clicks drawn with its smart tools mark the object, and the answer is a region
  of that polygon/brush control (its vocabulary, its result type) outlining the object;
* the optional per-region caption field: a ``<TextArea perRegion="true">`` on the same image;
* the ``<Image>`` objects and the task data key each one reads (``value="$image"`` -> ``image``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from backend.bounded_cache import BoundedCache

#: region control tag (lower case) -> geometry kind
REGION_TAGS = {
    "brushlabels": "brush", "brush": "brush",
    "polygonlabels": "polygon", "polygon": "polygon",
    "rectanglelabels": "rectangle", "rectangle": "rectangle",
}
#: geometry kind -> result type of a labelled region of that kind
LABELLED_TYPE = {"brush": "brushlabels", "polygon": "polygonlabels", "rectangle": "rectanglelabels"}
#: control tags (lower case) that can mark an object for a polygon/brush control (``smartOnly="true"``) -> kind
PROMPT_TAGS = {"rectanglelabels": "rectangle", "rectangle": "rectangle",
               "keypointlabels": "keypoint", "keypoint": "keypoint"}
#: region kinds a prompt control's answer can take, in order of preference
PROMPTED_KINDS = ("polygon", "brush")


class LabelConfigError(ValueError):
    """The label config cannot be parsed or has nothing this backend can label."""


@dataclass(frozen=True)
class RegionControl:
    """One control whose regions the backend labels."""

    name: str
    tag: str  # lower case, e.g. "brushlabels"
    kind: str  # "brush" | "polygon" | "rectangle"
    to_name: str  # the <Image> it draws on
    labels: tuple[str, ...]  # vocabulary (may be empty for a plain tool without <Labels>)
    labels_control: str | None  # name of the control whose result carries the label (None: cannot carry one)
    #: prompt controls only: the polygon/brush control whose region answers a box or clicks drawn with this one
    answers_as: RegionControl | None = None

    @property
    def labelled_type(self) -> str:
        return LABELLED_TYPE[self.kind]

    @property
    def output(self) -> RegionControl:
        """The control whose region type, vocabulary and labels control the answer takes (itself, or the
        polygon/brush control a prompt control marks objects for)."""
        return self.answers_as or self


@dataclass(frozen=True)
class CaptionControl:
    name: str
    to_name: str


@dataclass(frozen=True)
class ImageObject:
    name: str
    data_key: str  # task["data"][data_key] holds the image URL


@dataclass(frozen=True)
class ProjectConfig:
    """Parsed label config (immutable; cached by config text)."""

    xml: str
    region_controls: dict[str, RegionControl]
    captions: dict[str, CaptionControl]  # by image name
    images: dict[str, ImageObject]
    interface: object  # label_studio_sdk.label_interface.LabelInterface

    def control(self, name: str) -> RegionControl | None:
        return self.region_controls.get(name)

    def validate_prediction(self, prediction: dict) -> list[str]:
        """label-studio-sdk's validation errors for a prediction (empty list: valid)."""
        return list(self.interface.validate_prediction(prediction, return_errors=True) or [])  # type: ignore[attr-defined]


def parse_label_config(xml: str, extra_labels: tuple[str, ...] = ()) -> ProjectConfig:
    """Parse ``xml``; raises :class:`LabelConfigError` when it has no image region control."""
    from label_studio_sdk.label_interface import LabelInterface

    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty")
    try:
        li = LabelInterface(xml)
    except Exception as exc:  # noqa: BLE001 - the SDK raises lxml / its own errors
        raise LabelConfigError(f"cannot parse the label config: {exc}") from None
    try:
        li.validate()  # Label Studio's schema, unique names, toName references
    except Exception as exc:  # noqa: BLE001 - the SDK's validation errors have no common base
        raise LabelConfigError(f"invalid label config: {exc}") from None

    images: dict[str, ImageObject] = {}
    for obj in li.objects:
        if obj.tag.lower() != "image":
            continue
        value = (obj.value or "").strip()
        if not value.startswith("$") or len(value) < 2:
            raise LabelConfigError(f'<Image name="{obj.name}"> needs value="$<task data key>", got {value!r}')
        images[obj.name] = ImageObject(obj.name, value[1:])

    generic_labels: dict[str, tuple[str, tuple[str, ...]]] = {}
    captions: dict[str, CaptionControl] = {}
    for c in li.controls:
        tag = c.tag.lower()
        to_names = [t for t in (c.to_name or []) if t in images]
        if tag == "labels":
            for t in to_names:
                generic_labels.setdefault(t, (c.name, tuple(c.labels or ())))
        elif tag == "textarea" and str(c.attr.get("perRegion", "")).lower() == "true":
            for t in to_names:
                captions.setdefault(t, CaptionControl(c.name, t))

    controls: dict[str, RegionControl] = {}
    for c in li.controls:
        tag = c.tag.lower()
        kind = REGION_TAGS.get(tag)
        if kind is None:
            continue
        to_names = [t for t in (c.to_name or []) if t in images]
        if not to_names:
            continue
        to_name = to_names[0]
        if tag.endswith("labels"):
            labels, labels_control = tuple(c.labels or ()), c.name
        elif to_name in generic_labels:
            labels_control, labels = generic_labels[to_name]
        else:
            labels, labels_control = (), None
        if not labels:
            labels = tuple(extra_labels)
        labels = tuple(dict.fromkeys(lab for lab in labels if lab and lab.strip()))
        controls[c.name] = RegionControl(c.name, tag, kind, to_name, labels, labels_control)

    for name, prompt in _prompt_controls(li, images, controls).items():  # after the controls they answer as
        controls.pop(name, None)
        controls[name] = prompt
    if not controls:
        raise LabelConfigError(
            "the label config has no region control on an <Image>: use BrushLabels, PolygonLabels or "
            "RectangleLabels (or Brush/Polygon/Rectangle)")
    if not any(c.labels for c in controls.values()):
        raise LabelConfigError(
            "no label vocabulary: add <Label value=...> children to the region control (or a <Labels> "
            "control on the same image), or set MASKINV_LABELS")
    return ProjectConfig(xml, controls, captions, images, li)


def _prompt_controls(li: object, images: dict[str, ImageObject], controls: dict[str, RegionControl]
                     ) -> dict[str, RegionControl]:
    """``smartOnly`` rectangle / keypoint controls on an image with a polygon or brush control, each answering as
    the first such control (polygon before brush) of its image."""
    out: dict[str, RegionControl] = {}
    for c in li.controls:  # type: ignore[attr-defined]
        tag = c.tag.lower()
        if tag not in PROMPT_TAGS or str(c.attr.get("smartOnly", "")).lower() != "true":
            continue
        for to_name in (t for t in (c.to_name or []) if t in images):
            target = next((t for kind in PROMPTED_KINDS for t in controls.values()
                           if t.kind == kind and t.to_name == to_name and t.answers_as is None), None)
            if target is not None:
                out[c.name] = RegionControl(c.name, tag, PROMPT_TAGS[tag], to_name, target.labels,
                                            target.labels_control, answers_as=target)
                break
    return out


class ConfigCache:
    """Small LRU of parsed configs keyed by (config text, extra labels) — parsing takes milliseconds."""

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self._data: BoundedCache[str, ProjectConfig] = BoundedCache(max_entries)

    def get(self, xml: object, extra_labels: tuple[str, ...] = ()) -> ProjectConfig:
        """The parsed config of ``xml`` (None: empty); LabelConfigError for anything but an XML string."""
        if xml is None:
            xml = ""
        if not isinstance(xml, str):
            raise LabelConfigError(f"the label config must be an XML string, got {type(xml).__name__}")
        key = hashlib.sha256(xml.encode() + b"\0" + "\0".join(extra_labels).encode()).hexdigest()
        hit = self._data.get(key)
        if hit is not None:
            return hit
        cfg = parse_label_config(xml, extra_labels)
        self._data.put(key, cfg)
        return cfg
