"""Which submitted regions a person accepted: Label Studio 1.23's per-region ``origin``.

Label Studio's labelling page (1.23.2, ``web/dist/apps/labelstudio/358.js``, the region model) gives every region
an ``origin``, one of ``"prediction"``, ``"prediction-changed"`` and ``"manual"`` (the default), and writes it
into each result item of the region when the annotation is submitted:

* a region that came from a prediction (pre-filled draft, or a prediction copied into the annotation) keeps
  ``"prediction"`` while nobody touches it;
* moving or resizing it, or changing its label or its text (``updateOriginOnEdit``) makes it
  ``"prediction-changed"``;
* a region drawn by hand is ``"manual"``.

Annotations made through the API carry no ``origin`` unless the client sends one: they count as a person's.
A region submitted untouched is the model's own guess, not a person's answer: it is no example unless the
project opts in (``MASKINV_LEARN_PREDICTED``).
"""

from __future__ import annotations

from typing import Any, Iterable

#: the origin of a region submitted exactly as the prediction proposed it
UNTOUCHED = "prediction"


def untouched(items: Iterable[Any], region_id: str) -> bool:
    """Whether every result item of region ``region_id`` says ``origin: "prediction"`` (none edited, none drawn by
    hand); a region with no item naming an origin is a person's."""
    origins = [it.get("origin") for it in items if isinstance(it, dict) and str(it.get("id")) == region_id]
    return bool(origins) and all(o == UNTOUCHED for o in origins)


def learns_untouched(opted_in: tuple[str, ...], project: str | None) -> bool:
    """Whether ``project``'s untouched predicted regions become examples (``opted_in``: MASKINV_LEARN_PREDICTED's
    project ids, ``"*"`` for every project)."""
    return "*" in opted_in or (project is not None and str(project) in opted_in)
