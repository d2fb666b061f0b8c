"""GET /search serves the search page; GET /search/crop cuts an indexed region's box out of its task's image."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from backend_support import png_bytes, rect

from backend.labelstudio.api import LabelStudioAPI


@pytest.fixture
def indexed(make_client, tmp_path):
    client = make_client(MASKINV_DATA_DIR=str(tmp_path / "data"), MASKINV_WEBHOOK_QUEUE="0",
                         LABEL_STUDIO_URL="http://ls.example", LABEL_STUDIO_API_KEY="token")
    from backend_support import config, task

    body = {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": config("rectangle")},
            "annotation": {"id": 11, "task": 1, "project": 1, "was_cancelled": False,
                           "result": [rect("a", x=10, y=20, w=40, h=50, labels=("car",))]},
            "task": task(1, 0)}
    assert client.post("/webhook", json=body).get_json()["status"] == "stored"
    return client


def test_the_page_is_served_with_its_form(indexed):
    resp = indexed.get("/search")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert '<form id="q">' in html and "fetch(window.location.pathname" in html


def test_crop_is_the_region_box_of_the_task_image(indexed, monkeypatch):
    image = png_bytes(200, 100, 3)
    monkeypatch.setattr(LabelStudioAPI, "get_task", lambda self, tid: {"id": tid, "data": {"image": "/data/x.png"}})
    service = indexed.application.config["MASKINV_SERVICE"]
    monkeypatch.setattr(service.fetcher, "fetch", lambda url, *a, **k: image)
    resp = indexed.get("/search/crop", query_string={"project": 1, "task": 1, "region": "a", "annotation": "11"})
    assert resp.status_code == 200 and resp.mimetype == "image/png", resp.get_data(as_text=True)
    crop = Image.open(io.BytesIO(resp.data))
    # box 40 % x 50 % of 200 x 100 plus 15 % margins: 104 x 65, within the 160 px thumbnail
    assert crop.size[0] == 104 and abs(crop.size[1] - 65) <= 1
    missing = indexed.get("/search/crop", query_string={"project": 1, "task": 1, "region": "zz"})
    assert missing.status_code == 400 and "not in the index" in missing.get_json()["error"]
    bad = indexed.get("/search/crop", query_string={"project": 1, "task": "x", "region": "a"})
    assert bad.status_code == 400
