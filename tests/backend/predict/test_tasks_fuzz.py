"""Fuzz run of ``/predict`` (embedded mode, tiny model): generated bodies, from any JSON value to nearly valid
Label Studio requests with hostile parts, never get a 5xx or a traceback; answers that are predictions validate
against the label config."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from backend.labelstudio.label_config import parse_label_config
from backend_support import config, data_uri, png_bytes
from fuzz_support import junk, region_items

pytestmark = pytest.mark.fuzz

CONFIG_NAMES = ("brush", "polygon", "rectangle")
CONFIGS = {config(n): parse_label_config(config(n)) for n in CONFIG_NAMES}
ENV = {"MASKINV_SIZE": "32", "MASKINV_STEPS": "1", "MASKINV_MAX_STEPS": "2", "MASKINV_MAX_SIZE": "64",
       "MASKINV_MAX_IMAGE_PIXELS": "1000000", "MASKINV_FETCH_TIMEOUT": "2", "MASKINV_TIMEOUT": "60",
       "MASKINV_BATCH_TIMEOUT": "60", "MASKINV_MAX_TASKS": "4", "MASKINV_MAX_REGIONS": "6",
       "MASKINV_PROPOSALS": "off"}  # proposals for region-less tasks: tests/backend/predict/test_propose.py


def _images() -> list[str]:
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 4), np.uint8), "RGBA")
    rotated = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 20, 3), np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    out = []
    for img, fmt, kw in ((rgba, "PNG", {}), (rotated, "JPEG", {"exif": exif}),
                         (Image.new("1", (3000, 3000)), "PNG", {})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append(data_uri(buf.getvalue()))
    return [data_uri(png_bytes(40, 30, 4)), *out]


IMAGES = _images()
def sometimes(valid, hostile, one_in: int = 5):
    """``valid`` mostly, ``hostile`` about once in ``one_in`` draws."""
    return st.integers(0, one_in - 1).flatmap(lambda k: hostile if k == 0 else valid)


image_values = sometimes(st.sampled_from(IMAGES[:3]), st.one_of(
    st.sampled_from(IMAGES[3:]),
    st.sampled_from(["file:///etc/passwd", "http://127.0.0.1:1/x.png", "http://169.254.169.254/",
                     "/data/upload/1/a.png",
                     "/data/local-files/?d=../../etc/passwd", "s3://bucket/key.png", "data:image/png;base64,!!!",
                     "data:,plain", "gopher://x", "//evil/x.png", ""]),
    junk), 4)


@st.composite
def valid_regions(draw, kind: str):
    """A well-formed region of the shipped config ``kind`` (the model path gets exercised)."""
    base = {"id": draw(st.text("abcdef0123456789", min_size=3, max_size=8)), "from_name": "label",
            "to_name": "image", "original_width": 40, "original_height": 30, "image_rotation": 0}
    if kind == "rectangle":
        value = {"x": draw(st.floats(0, 80)), "y": draw(st.floats(0, 80)), "width": draw(st.floats(2, 40)),
                 "height": draw(st.floats(2, 40)), "rotation": draw(st.floats(-45, 45))}
    elif kind == "polygon":
        value = {"points": draw(st.lists(st.lists(st.floats(0, 100), min_size=2, max_size=2), min_size=3,
                                         max_size=6))}
    else:
        mask = np.zeros((30, 40), bool)
        y, x = draw(st.integers(0, 25)), draw(st.integers(0, 35))
        mask[y:y + draw(st.integers(1, 10)), x:x + draw(st.integers(1, 10))] = True
        value = {"format": "rle", "rle": list(mask2rle(mask.astype(np.uint8) * 255))}
    return {**base, "type": f"{kind}labels", "value": {**value, f"{kind}labels": ["car"]}}


@st.composite
def tasks(draw, regions):
    task = {"id": draw(sometimes(st.integers(0, 10**6), junk)),
            "data": draw(sometimes(st.fixed_dictionaries({"image": image_values}), junk, 10))}
    for key in ("annotations", "predictions"):
        if key == "annotations" or draw(st.booleans()):
            task[key] = draw(sometimes(st.lists(st.fixed_dictionaries(
                {"id": st.integers(0, 99), "result": sometimes(regions, junk, 10),
                 "was_cancelled": sometimes(st.just(False), st.booleans()),
                 "updated_at": st.one_of(st.text(max_size=4), junk)}), min_size=1, max_size=2),
                junk, 10))
    return task


overrides = st.dictionaries(
    st.sampled_from(["steps", "lr", "alpha", "size", "top_k", "templates", "caption", "labels", "bogus"]),
    st.one_of(junk, st.integers(0, 3), st.sampled_from([32, 40, 64, 65]), st.floats(0.01, 2.0),
              st.lists(st.sampled_from(["a {}.", "the {}", "no placeholder", "cat", "dog", ""]), max_size=3)),
    max_size=3)


@st.composite
def bodies(draw):
    if draw(st.integers(0, 19)) == 0:
        return draw(st.one_of(junk, st.lists(junk, max_size=3)))
    kind = draw(st.sampled_from(CONFIG_NAMES))
    one_region = sometimes(valid_regions(kind), region_items().map(lambda kv: kv[1]), 4)
    regions = st.lists(one_region, min_size=1, max_size=4)
    body: dict = {"label_config": draw(sometimes(st.just(config(kind)), st.one_of(
        junk, st.sampled_from(["<View/>", "<View><Image", "<x>&lol;</x>"])), 10))}
    interactive = draw(st.booleans())
    if draw(st.integers(0, 19)):
        n = (1, 1) if interactive and draw(st.integers(0, 9)) else (1, 3)
        body["tasks"] = draw(sometimes(st.lists(tasks(regions), min_size=n[0], max_size=n[1]), junk, 10))
    params: dict = {}
    if interactive:
        params["context"] = draw(sometimes(st.fixed_dictionaries({"result": regions}), junk, 10))
    if draw(st.integers(0, 3)) == 0:
        params["maskinv"] = draw(sometimes(overrides, junk, 4))
    body["params"] = draw(sometimes(st.just(params), junk, 10))
    return body


@pytest.fixture(scope="module")
def fuzz_client(tiny_runtime):
    from backend.http.app import create_app
    from backend.settings import Settings

    return create_app(Settings.from_env({**ENV, "MASKINV_WARMUP": "0"})).test_client()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bodies())
def test_predict_never_answers_5xx(fuzz_client, body):
    resp = fuzz_client.post("/predict", data=json.dumps(body), content_type="application/json")
    text = resp.get_data(as_text=True)
    assert resp.status_code < 500, text[:2000]
    assert "Traceback" not in text
    answer = resp.get_json()
    event(f"HTTP {resp.status_code}")
    if resp.status_code != 200:
        assert isinstance(answer.get("error"), str) and answer["error"]
        return
    results = answer["results"]
    assert len(results) == len(body["tasks"])
    cfg = CONFIGS.get(body["label_config"])
    for res in results:
        assert res == [] or "result" in res or isinstance(res.get("error"), str)
        if isinstance(res, dict) and "result" in res:
            event("a task labelled")
            assert 0.0 <= res["score"] <= 1.0
            if cfg is not None:
                assert cfg.validate_prediction(res) == [], res
