"""Hostile or broken /predict and /setup requests (embedded mode, tiny model): every one is a 4xx with a JSON
message or a per-region/per-task error, never a 500, never a traceback, never a huge allocation."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from backend_support import H, W, brush, config, data_uri, labelled, poly, predict, rect, task

pytestmark = pytest.mark.hardening

#: (the backend's Flask app is a per-process singleton: a test uses one client configuration at a time)
LIMITS = {"MASKINV_MAX_BODY_MB": "1", "MASKINV_MAX_TASKS": "3", "MASKINV_MAX_REGIONS": "4",
          "MASKINV_MAX_LABELS": "20", "MASKINV_MAX_TEMPLATES": "3", "MASKINV_MAX_STEPS": "5", "MASKINV_MAX_SIZE": "64"}


@pytest.fixture
def limited(make_client):
    return make_client(**LIMITS)


def no_traceback(resp) -> None:
    text = resp.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    assert resp.is_json, text[:200]


def test_body_over_the_cap_is_413(limited):
    big = {"tasks": [task(1)], "label_config": config("rectangle"), "pad": "x" * (2 << 20)}
    resp = limited.post("/predict", json=big)
    assert resp.status_code == 413 and "MASKINV_MAX_BODY_MB" in resp.get_json()["error"]
    no_traceback(resp)


def test_chunked_body_over_the_cap_is_413(limited):
    """No Content-Length (chunked transfer): the body is read with the cap, not in full."""
    body = json.dumps({"tasks": [], "pad": "x" * (2 << 20)}).encode()
    resp = limited.post("/predict", input_stream=io.BytesIO(body), content_type="application/json",
                        environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""})
    assert resp.status_code == 413
    assert limited.post("/webhook", input_stream=io.BytesIO(body), content_type="application/json",
                        environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""}).status_code == 413


@pytest.mark.parametrize("raw, match", [
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"tasks": [', "not valid JSON"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b"", "JSON object"),
    (b'"just a string"', "JSON object"),
])
def test_malformed_json_is_400(client, raw, match):
    for route in ("/predict", "/setup"):
        resp = client.post(route, data=raw, content_type="application/json")
        assert resp.status_code == 400 and match in resp.get_json()["error"]
        no_traceback(resp)


def test_task_and_region_limits(limited):
    resp = predict(limited, "rectangle", [task(i) for i in range(4)])
    assert resp.status_code == 413 and "MASKINV_MAX_TASKS=3" in resp.get_json()["error"]
    many = [rect(f"r{i}", x=5 + i, y=5) for i in range(5)]
    resp = predict(limited, "rectangle", [task(1)], context={"result": many})
    assert resp.status_code == 413 and "MASKINV_MAX_REGIONS=4" in resp.get_json()["error"]
    # batch: the crowded task gets an error, the other task is labelled
    resp = predict(limited, "rectangle", [task(1, annotations=[{"id": 1, "result": many}]),
                                          task(2, annotations=[{"id": 2, "result": [rect("ok")]}])])
    crowded, fine = resp.get_json()["results"]
    assert "MASKINV_MAX_REGIONS=4" in crowded["error"] and "result" not in crowded
    assert set(labelled(fine["result"], "rectanglelabels")) == {"ok"}


@pytest.mark.parametrize("maskinv, match", [
    ({"steps": 6}, "MASKINV_MAX_STEPS=5"),
    ({"size": 128}, "MASKINV_MAX_SIZE=64"),
    ({"steps": True}, "must be an integer"),
    ({"lr": False}, "must be a number"),
    ({"caption": "yes"}, "true or false"),
    ({"templates": ["a {}."] * 4}, "MASKINV_MAX_TEMPLATES=3"),
    ({"templates": ["x" * 2000 + "{}"]}, "at most 1000 characters"),
    ({"labels": [f"l{i}" for i in range(21)]}, "MASKINV_MAX_LABELS=20"),
    ({"labels": ["x" * 1001]}, "at most 200 characters"),  # MASKINV_MAX_LABEL_CHARS
    ({"labels": "cat"}, "non-empty list"),
    ({"exec": "rm -rf /"}, "unknown key"),
    ("not an object", "must be an object"),
])
def test_parameter_overrides_are_bounded(limited, maskinv, match):
    resp = predict(limited, "rectangle", [task(1)], context={"result": [rect("a")]}, maskinv=maskinv)
    assert resp.status_code == 400 and match in resp.get_json()["error"]


def test_label_configs_over_the_vocabulary_limit_or_malformed(make_client):
    limited = make_client(**LIMITS)  # one app per process: make the clients one after the other
    labels = "".join(f'<Label value="l{i}"/>' for i in range(21))
    big = f'<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">{labels}' \
          '</RectangleLabels></View>'
    for resp in (limited.post("/setup", json={"schema": big}),
                 limited.post("/predict", json={"tasks": [task(1)], "label_config": big})):
        assert resp.status_code == 400 and "MASKINV_MAX_LABELS=20" in resp.get_json()["error"]
    client = make_client()
    for bad in ("<View><Image", "<View/>", 42, ["<View/>"], {"xml": "<View/>"}, "<?xml version='1.0'?><!DOCTYPE x>"):
        for resp in (client.post("/setup", json={"schema": bad}),
                     client.post("/predict", json={"tasks": [task(1)], "label_config": bad})):
            assert resp.status_code == 400 and resp.get_json()["error"].startswith(("label config", "the request"))
            no_traceback(resp)


def test_xml_entities_in_label_configs_are_not_expanded(client, tmp_path):
    """XXE (a file's content as a label) and entity-expansion bombs are refused by the XML parser."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xxe = (f'<?xml version="1.0"?><!DOCTYPE View [<!ENTITY x SYSTEM "file://{secret}">]><View>'
           '<Image name="image" value="$image"/><RectangleLabels name="label" toName="image"><Label value="&x;"/>'
           '</RectangleLabels></View>')
    lol = "".join(f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10 if i else "lol"}">' for i in range(10))
    bomb = (f'<?xml version="1.0"?><!DOCTYPE View [{lol}]><View><Image name="image" value="$image"/>'
            '<RectangleLabels name="label" toName="image"><Label value="&l9;"/></RectangleLabels></View>')
    for xml in (xxe, bomb):
        resp = client.post("/setup", json={"schema": xml})
        assert resp.status_code == 400
        assert "TOP-SECRET" not in resp.get_data(as_text=True)


def region(rtype: str, value: dict, **frame) -> dict:
    item = {"id": "bad", "from_name": "label", "to_name": "image", "type": rtype, "original_width": W,
            "original_height": H, "value": value}
    item.update(frame)
    return item


BAD_REGIONS = [
    (region("polygonlabels", {"points": [[10, 10], [50, 50]]}), "at least 3 points"),
    (region("polygonlabels", {"points": [[10, 10], [50, 1e300], [40, 70]]}), "out of range"),
    (region("polygonlabels", {"points": [[10, 10], [-50, 20], [40, 70]]}), "out of range"),
    (region("polygonlabels", {"points": [[10, 10], [50, float("nan")], [40, 70]]}), "finite number"),
    (region("polygonlabels", {"points": [[1, 1]] * 100001}), "more than 100000"),
    (region("rectanglelabels", {"x": 150, "y": 10, "width": 10, "height": 10}), "out of range"),
    (region("rectanglelabels", {"x": 10, "y": 10, "width": 1e9, "height": 10}), "out of range"),
    (region("rectanglelabels", {"x": 10, "y": 10, "width": 10, "height": 10, "rotation": float("inf")}),
     "finite number"),
    (region("rectanglelabels", {"x": 10, "y": 10, "width": 10, "height": 10}, original_width=float("inf")),
     "original_width/original_height"),
    (region("rectanglelabels", {"x": 10, "y": 10, "width": 10, "height": 10}, original_width=100000,
            original_height=100000), "MASKINV_MAX_IMAGE_PIXELS"),
    (region("rectanglelabels", {"x": 10, "y": 10, "width": 10, "height": 10}, original_width=-3), "numbers >= 1"),
    (region("keypointlabels", {"x": 10, "y": 10}), "unsupported region type"),
    (region("ellipselabels", {"x": 10, "y": 10, "radiusX": 3, "radiusY": 3}), "unsupported region type"),
    (region("brushlabels", {"format": "rle", "rle": [0, 0, 0, 4, 1, 2, 3]}), "encodes 4 values"),
    (region("brushlabels", {"format": "png", "rle": [1] * 10}), "only 'rle'"),
    (region("brushlabels", {"format": "rle", "rle": [0] * (4 * 1024 * 1024 + 1)}), "more than 4194304"),
]


@pytest.mark.parametrize("item, match", BAD_REGIONS, ids=[f"{i}" for i in range(len(BAD_REGIONS))])
def test_bad_regions_are_per_region_errors(make_client, item, match):
    """The bad region gets an error naming the problem; a good region of the same task is still labelled."""
    client = make_client(MASKINV_MAX_BODY_MB=64)
    cfg = next((k for k in ("polygon", "brush") if k in item["type"]), "rectangle")
    mask = np.zeros((H, W), bool)
    mask[10:40, 20:60] = True
    good = {"polygon": poly("good", [[10, 10], [60, 10], [40, 70]]), "brush": brush("good", mask),
            "rectangle": rect("good")}[cfg]
    resp = predict(client, cfg, [task(1, annotations=[{"id": 1, "result": [item, good]}])])
    assert resp.status_code == 200, resp.get_json()
    (pred,) = resp.get_json()["results"]
    errors = {e["region"]: e["error"] for e in pred["maskinv"]["errors"]}
    assert match in errors["bad"], errors
    assert {r["id"] for r in pred["result"]} == {"good"}


def test_brush_frame_bomb_is_refused_without_allocating(client):
    """A 14-byte RLE declaring 4 x 30000 x 30000 values (3.6 GB) with a matching frame: refused up front."""
    n = 4 * 30000 * 30000
    rle = list((n & 0xFFFFFFFF).to_bytes(4, "big")) + [0] * 10
    item = region("brushlabels", {"format": "rle", "rle": rle}, original_width=30000, original_height=30000)
    resp = predict(client, "brush", [task(1)], context={"result": [item]})
    assert resp.status_code == 422 and "MASKINV_MAX_IMAGE_PIXELS" in resp.get_json()["error"]


def png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def test_image_bombs_and_broken_images_are_per_task_errors(make_client):
    client = make_client(MASKINV_MAX_IMAGE_PIXELS=1_000_000)
    bomb = png(Image.new("1", (12000, 12000)))  # ~20 KB file, 144 megapixels
    huge = png(Image.new("1", (20000, 20000)))  # over Pillow's own bomb limit too
    truncated = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)))[:-200]
    tasks = [{"id": 1, "data": {"image": data_uri(bomb)}, "annotations": [{"id": 1, "result": [rect("a")]}]},
             {"id": 2, "data": {"image": data_uri(truncated)}, "annotations": [{"id": 2, "result": [rect("b")]}]},
             {"id": 3, "data": {"image": data_uri(b"GIF89a not really")},
              "annotations": [{"id": 3, "result": [rect("c")]}]},
             {"id": 4, "data": {"image": "file:///etc/passwd"}, "annotations": [{"id": 4, "result": [rect("d")]}]},
             {"id": 5, "data": {"image": "http://169.254.169.254/latest/meta-data/"},
              "annotations": [{"id": 5, "result": [rect("e")]}]},
             task(6, annotations=[{"id": 6, "result": [rect("f")]}]),
             {"id": 7, "data": {"image": data_uri(huge)}, "annotations": [{"id": 7, "result": [rect("g")]}]}]
    resp = predict(client, "rectangle", tasks)
    assert resp.status_code == 200
    bomb_ans, trunc_ans, gif_ans, file_ans, ssrf_ans, good, huge_ans = resp.get_json()["results"]
    assert "12000x12000 pixels" in bomb_ans["error"] and "MASKINV_MAX_IMAGE_PIXELS" in bomb_ans["error"]
    assert "decompression bomb" in huge_ans["error"] and "MASKINV_MAX_IMAGE_PIXELS" in huge_ans["error"]
    assert "cannot" in trunc_ans["error"] or "truncated" in trunc_ans["error"]
    assert "cannot be decoded" in gif_ans["error"]
    assert "scheme file: is not allowed" in file_ans["error"]
    assert "not allowed" in ssrf_ans["error"] and "MASKINV_ALLOWED_HOSTS" in ssrf_ans["error"]
    assert set(labelled(good["result"], "rectanglelabels")) == {"f"}


def test_no_route_answers_with_a_traceback(client):
    for method, route, kwargs in (("get", "/nope", {}), ("delete", "/predict", {}), ("post", "/health", {}),
                                  ("post", "/webhook", {"data": b"[[[["}), ("post", "/versions", {"data": b"{"}),
                                  ("post", "/train", {"json": {"x": 1}})):
        resp = getattr(client, method)(route, **kwargs)
        assert resp.status_code < 500, (route, resp.status_code)
        no_traceback(resp)


def test_mask_memory_of_a_request_is_bounded(make_client):
    """Region frames (original_width x original_height) are the client's word: the rasterised masks a request
    holds are capped by MASKINV_MAX_MASK_MPIX, beyond it regions get a limit error, the rest are labelled."""
    client = make_client(MASKINV_MAX_MASK_MPIX="1", MASKINV_MASK_MAX_SIDE="1024")
    huge = {**rect("huge"), "original_width": 7000, "original_height": 7000}  # -> a 1024 x 1024 mask (1 Mpix)
    resp = predict(client, "rectangle", [task(1, annotations=[{"id": 1, "result": [huge]}]),
                                         task(2, annotations=[{"id": 2, "result": [rect("small")]}])])
    first, second = resp.get_json()["results"]
    assert set(labelled(first["result"], "rectanglelabels")) == {"huge"}
    assert "MASKINV_MAX_MASK_MPIX=1" in second["error"] and "result" not in second
    resp = predict(client, "rectangle", [task(1)], context={"result": [huge, rect("after")]})
    assert resp.status_code == 200, resp.get_json()
    errors = resp.get_json()["results"][0]["maskinv"]["errors"]
    assert [e["region"] for e in errors] == ["after"] and "MASKINV_MAX_MASK_MPIX" in errors[0]["error"]


def test_redis_passwords_never_reach_clients_or_logs():
    from backend.settings import Settings, redact_url

    assert redact_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    s = Settings.from_env({"REDIS_URL": "redis://:s3cret@127.0.0.1:1/0"})
    assert "s3cret" not in s.redis_url_redacted and s.redis_url.endswith("@127.0.0.1:1/0")
