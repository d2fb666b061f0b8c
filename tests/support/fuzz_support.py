"""Hypothesis strategies shared by the fuzz tests (no tests here; imported as ``fuzz_support``)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import mask2rle

junk = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.text(max_size=5),
                 st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
coord = st.one_of(st.floats(-20, 120), st.floats(allow_nan=True, allow_infinity=True), st.integers(-200, 300), junk)
size = st.one_of(st.integers(1, 300), st.floats(0.5, 300.0), junk)


@st.composite
def rle_values(draw):
    """A brush RLE: a real one (maybe for another size, maybe cut or corrupted) or junk."""
    kind = draw(st.sampled_from(["real", "cut", "flipped", "junk", "ints"]))
    if kind in ("real", "cut", "flipped"):
        h, w = draw(st.integers(1, 30)), draw(st.integers(1, 30))
        seed = draw(st.integers(0, 2**16))
        mask = np.random.default_rng(seed).random((h, w)) < 0.4
        rle = list(mask2rle(mask.astype(np.uint8) * 255))
        if kind == "cut":
            rle = rle[:draw(st.integers(0, len(rle)))]
        elif kind == "flipped" and rle:
            i = draw(st.integers(0, len(rle) - 1))
            rle[i] = draw(st.integers(0, 255))
        return rle
    if kind == "ints":
        return draw(st.lists(st.integers(-5, 300), max_size=40))
    return draw(junk)


@st.composite
def region_items(draw):
    kind = draw(st.sampled_from(["rectangle", "polygon", "brush"]))
    rtype = draw(st.sampled_from([f"{kind}labels", kind, "keypointlabels", "textarea", "", "RectangleLabels"]))
    if kind == "rectangle":
        value = {k: draw(coord) for k in ("x", "y", "width", "height")}
        if draw(st.booleans()):
            value["rotation"] = draw(coord)
    elif kind == "polygon":
        value = {"points": draw(st.one_of(st.lists(st.lists(coord, min_size=0, max_size=3), max_size=8), junk))}
    else:
        value = {"format": draw(st.sampled_from(["rle", "png", None])), "rle": draw(rle_values())}
    item = {"id": draw(st.one_of(st.text(min_size=1, max_size=4), st.integers(), st.none())),
            "from_name": draw(st.sampled_from(["label", "label", "other", 3])), "to_name": "image",
            "type": rtype, "value": draw(st.one_of(st.just(value), junk))}
    for key in ("original_width", "original_height"):
        if draw(st.booleans()):
            item[key] = draw(size)
    return kind, item
