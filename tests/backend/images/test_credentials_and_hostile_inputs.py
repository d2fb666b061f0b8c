"""Credentials and hostile inputs at the backend's edges, one test (or more) for each way an attacker tried:
the API key sent to another host through a parser differential or a redirect; a /setup token paired with the
wrong host; one corrupt brush RLE failing the whole request; unbounded config labels; template amplification and
templates with several fields; '..' in d=/filepath= without local roots; /health details and paths without
credentials; an image cache without expiry (the worker side: tests/worker/text/test_labels_bounds.py). Every server
here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.images.policy import parse_allow_list
from backend.images.fetch import ImageError, ImageFetcher
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.regions import Region, RegionError, region_mask
from backend.images.urls import UnsafeURL, parse_http_url
from backend_support import W, H, config, labelled, png_bytes, predict, rect, task

IMAGE = png_bytes(24, 16, seed=5)
OTHER_IMAGE = png_bytes(24, 16, seed=6)
TOKEN = "fedcba9876543210fedcba9876543210fedcba98"


# -- two real HTTP servers on loopback ------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


class Site:
    """A loopback HTTP server that records (path, Authorization) of every request and serves ``self.body``."""

    def __init__(self):
        site = self
        self.seen: list[tuple[str, str | None]] = []
        self.body = IMAGE

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                site.seen.append((self.path, self.headers.get("Authorization")))
                query = parse_qs(urlsplit(self.path).query)
                if urlsplit(self.path).path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", query["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(site.body)))
                self.end_headers()
                self.wfile.write(site.body)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def authorizations(self) -> list[str]:
        return [a for _, a in self.seen if a]

    def close(self):
        self.server.shutdown()


@pytest.fixture
def sites():
    a, b = Site(), Site()
    yield a, b
    a.close()
    b.close()


# -- the Label Studio key never leaves for another host -----------------------------------------

def test_backslash_url_does_not_send_the_key_to_another_port(sites):
    """LABEL_STUDIO_URL on P1 with a key, P2 allow-listed: ``http://127.0.0.1:P2\\@127.0.0.1:P1/base.png``
    reached P2 with ``Authorization: Token <key>`` (urllib.parse read P1, the connection went to P2)."""
    ls, other = sites
    fetcher = ImageFetcher(ls.url, TOKEN, allowed_hosts=parse_allow_list(f"127.0.0.1:{other.port}"))
    attack = f"http://127.0.0.1:{other.port}\\@127.0.0.1:{ls.port}/base.png"
    via_redirect = f"{other.url}/redirect?to={quote(attack, safe='')}"
    variants = [attack, via_redirect,
                f"http://127.0.0.1:{ls.port}@127.0.0.1:{other.port}/base.png",  # userinfo
                f"http://127.0.0.1:{other.port}%5c@127.0.0.1:{ls.port}/base.png",
                f"http://127.0.0.1:{other.port}\t@127.0.0.1:{ls.port}/base.png"]
    for url in variants:
        with contextlib.suppress(ImageError):
            fetcher.fetch(url)
    assert other.authorizations() == []  # the second server never saw the key
    with pytest.raises(ImageError, match="backslash"):
        fetcher.fetch(attack)
    # the Label Studio origin itself still gets it, and the allow-listed host still serves images
    assert fetcher.fetch("/data/upload/1/base.png") == IMAGE
    assert ls.authorizations() == [f"Token {TOKEN}"]
    assert fetcher.fetch(f"{other.url}/plain.png") == IMAGE and other.authorizations() == []


def test_redirect_hop_to_another_port_never_carries_the_key(sites):
    """A redirect from Label Studio itself to a backslash URL, or to the allow-listed host, drops the key."""
    ls, other = sites
    fetcher = ImageFetcher(ls.url, TOKEN, allowed_hosts=parse_allow_list(f"127.0.0.1:{other.port}"))
    attack = f"http://127.0.0.1:{other.port}\\@127.0.0.1:{ls.port}/x.png"
    with pytest.raises(ImageError, match="refused image source"):
        fetcher.fetch(f"{ls.url}/redirect?to={quote(attack, safe='')}")
    assert fetcher.fetch(f"{ls.url}/redirect?to={quote(other.url + '/y.png', safe='')}") == IMAGE
    assert other.authorizations() == []
    assert ls.authorizations() == [f"Token {TOKEN}"] * 2, ls.seen  # both first hops went to Label Studio


def test_through_predict(sites, make_client):
    """The documented settings of the report, end to end through /predict."""
    ls, other = sites
    client = make_client(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=TOKEN,
                         MASKINV_ALLOWED_HOSTS=f"127.0.0.1:{other.port}")
    attack = f"http://127.0.0.1:{other.port}\\@127.0.0.1:{ls.port}/base.png"
    resp = predict(client, "rectangle", [{"id": 1, "data": {"image": attack}}], context={"result": [rect("a")]})
    assert resp.status_code == 422 and "backslash" in resp.get_json()["error"]
    assert other.seen == [] and ls.seen == []


@pytest.mark.parametrize("url", [
    "http://a.example:1\\@b.example:2/x.png",
    "http://a.example\\b.example/x.png",
    "http://user:pw@b.example/x.png",
    "http://a.example@b.example/",
    "http://a.example%40b.example/",
    "http://a.example%5c@b.example/",
    "http://a.example/x%5c..%5cy.png",
    "http://a.exa\tmple/",
    "http://a.example/\nHost: b/",
    "http://a.example/%0d%0aX: y",
    "http://a .example/",
    "http://\u0430.example/",  # Cyrillic 'a'
    "http://a.example:80:81/",
    "http://a.example:/",
    "http://[::1/",
    "http:/a.example/",
    "http://",
    "https://a.example:99999/",
])
def test_ambiguous_urls_are_refused(url):
    with pytest.raises(UnsafeURL):
        parse_http_url(url)


@pytest.mark.parametrize("url, expected", [
    ("http://LS.example:8080/data/upload/1/a.png", ("http", "ls.example", 8080)),
    ("https://ls.example/data/local-files/?d=my%20photos/a.png", ("https", "ls.example", 443)),
    ("http://127.0.0.1:9000/a b.png?x=1#frag", ("http", "127.0.0.1", 9000)),
    ("http://[::1]:8080/a.png", ("http", "::1", 8080)),
    ("http://ls.example./a.png", ("http", "ls.example", 80)),
])
def test_plain_urls_parse_the_same_everywhere(url, expected):
    p = parse_http_url(url)
    assert (p.scheme, p.host, p.port) == expected


# -- /setup hostname and token are one pair --------------------------------------------------------

def test_setup_token_is_never_sent_to_a_later_host(sites, make_client):
    a, b = sites
    client = make_client(MASKINV_ALLOWED_HOSTS="127.0.0.1")  # loopback stands in for public Label Studio hosts
    t = task(1)
    t["data"]["image"] = "/data/upload/1/x.png"
    assert client.post("/setup", json={"schema": config("rectangle"), "hostname": a.url,
                                       "access_token": "T-for-A"}).status_code == 200
    assert client.post("/setup", json={"schema": config("rectangle"), "hostname": b.url}).status_code == 200
    resp = predict(client, "rectangle", [t], context={"result": [rect("r")]})
    assert resp.status_code == 422 and "no token" in resp.get_json()["error"]
    assert b.authorizations() == [] and a.seen == []
    # a new pair works as a pair
    assert client.post("/setup", json={"schema": config("rectangle"), "hostname": b.url,
                                       "access_token": "T-for-B"}).status_code == 200
    resp = predict(client, "rectangle", [t], context={"result": [rect("r")]})
    assert resp.status_code == 200
    assert b.authorizations() == ["Token T-for-B"] and a.seen == []


def test_setup_hostname_that_parsers_read_differently_is_400(make_client):
    client = make_client()
    resp = client.post("/setup", json={"schema": config("rectangle"), "hostname": "http://a:1\\@b:2",
                                       "access_token": "T"})
    assert resp.status_code == 400 and "hostname" in resp.get_json()["error"]


# -- every region parser error is a per-region error ----------------------------------------------

def _valid_rle(mask: np.ndarray) -> list[int]:
    from label_studio_sdk.converter.brush import mask2rle

    return list(mask2rle(mask.astype(np.uint8) * 255))


def _overflowing_rle(width: int, height: int) -> list[int]:
    """A brush RLE with the right declared length whose content makes the SDK's decoder raise OverflowError."""
    from label_studio_sdk.converter.brush import decode_rle

    mask = np.zeros((height, width), bool)
    mask[5:20, 10:40] = True
    rle = _valid_rle(mask)
    rng = random.Random(0)
    for _ in range(10000):
        bad = list(rle)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(4, len(bad))] = rng.randrange(256)
        try:
            decode_rle(bad)
        except OverflowError:
            return bad
        except Exception:  # noqa: BLE001 - other corruptions: keep looking for the reported one
            continue
    raise AssertionError("no overflowing RLE found")


def test_corrupt_brush_rle_is_a_region_error_and_the_good_region_is_labelled(make_client):
    client = make_client()
    brush_cfg = ('<View><Image name="image" value="$image"/><BrushLabels name="label" toName="image">'
                 '<Label value="car"/><Label value="tree"/></BrushLabels>'
                 '<RectangleLabels name="box" toName="image"><Label value="car"/><Label value="tree"/>'
                 '</RectangleLabels></View>')
    corrupt = {"id": "bad", "from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": W,
               "original_height": H, "value": {"format": "rle", "rle": _overflowing_rle(W, H), "brushlabels": ["car"]}}
    good = {**rect("good"), "from_name": "box"}
    body = {"tasks": [task(1)], "label_config": brush_cfg,
            "params": {"context": {"result": [corrupt, good]}}}
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_json()
    (pred,) = resp.get_json()["results"]
    assert set(labelled(pred["result"], "rectanglelabels")) == {"good"}
    (err,) = pred["maskinv"]["errors"]
    assert err["region"] == "bad" and err["kind"] == "region" and "brush rle" in err["error"]


def _region(item: dict) -> Region:
    cfg = parse_label_config(config("brush") if item["type"] == "brushlabels" else config(
        "polygon" if item["type"] == "polygonlabels" else "rectangle"))
    return Region(item["id"], cfg.region_controls["label"], item)


_BASE_MASK = np.zeros((H, W), bool)
_BASE_MASK[10:40, 20:60] = True
_BASE_MASK[45:50, 5:70] = True
_BASE_RLE = _valid_rle(_BASE_MASK)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(4, len(_BASE_RLE) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(4, len(_BASE_RLE))),
       extra=st.lists(st.integers(0, 255), max_size=6))
def test_fuzz_mutated_rle_content_gives_a_mask_or_a_region_error(edits, cut, extra):
    """Mutates the CONTENT of a valid RLE (declared length kept): the parser returns a mask or a RegionError."""
    rle = list(_BASE_RLE)
    for i, v in edits:
        rle[i] = v
    if cut is not None:
        rle = rle[:cut] + extra
    item = {"id": "b", "from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": W,
            "original_height": H, "value": {"format": "rle", "rle": rle, "brushlabels": ["car"]}}
    try:
        mask = region_mask(_region(item), (W, H), 1024)
    except RegionError:
        return
    assert mask.dtype == bool and mask.shape == (H, W) and mask.any()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points=st.lists(st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-10**30, 10**30), st.text(max_size=2),
                                          st.none()), min_size=0, max_size=3), max_size=8),
       box=st.dictionaries(st.sampled_from(["x", "y", "width", "height", "rotation"]),
                           st.one_of(st.floats(), st.integers(-10**400, 10**400), st.text(max_size=3), st.none())))
def test_fuzz_polygons_and_rectangles_give_a_mask_or_a_region_error(points, box):
    for item in ({"id": "p", "from_name": "label", "to_name": "image", "type": "polygonlabels", "original_width": W,
                  "original_height": H, "value": {"points": points}},
                 {"id": "r", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": W,
                  "original_height": H, "value": box}):
        try:
            mask = region_mask(_region(item), (W, H), 1024)
        except RegionError:
            continue
        assert mask.dtype == bool and mask.any()


def test_a_crashing_parser_is_still_a_region_error(monkeypatch):
    """Any exception a (future) parser raises on a region's content is that region's RegionError."""
    import backend.labelstudio.regions as regions

    def broken(value, width, height):
        raise RuntimeError("a parser bug")

    monkeypatch.setattr(regions, "polygon_points", broken)
    item = {"id": "p", "from_name": "label", "to_name": "image", "type": "polygonlabels", "original_width": W,
            "original_height": H, "value": {"points": [[1, 1], [50, 1], [50, 50]]}}
    with pytest.raises(RegionError, match="malformed polygon region: RuntimeError: a parser bug"):
        region_mask(_region(item), (W, H))


# -- cases 4, 5, 6: labels and templates ---------------------------------------------------------------------

def _config_with_label(value: str) -> str:
    return (f'<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
            f'<Label value="car"/><Label value="{value}"/></RectangleLabels></View>')


def test_a_100000_character_config_label_is_400_naming_it(make_client):
    client = make_client()
    cfg = _config_with_label("q" * 100_000)
    requests = (lambda: client.post("/setup", json={"schema": cfg}),
                lambda: client.post("/predict", json={"tasks": [task(1)], "label_config": cfg,
                                                      "params": {"context": {"result": [rect("a")]}}}))
    for send in requests:  # one after the other: on main, the /predict would tokenise the label for ~80 s
        resp = send()
        assert resp.status_code == 400, resp.get_json()
        error = resp.get_json()["error"]
        assert "MASKINV_MAX_LABEL_CHARS=200" in error and "'qqqqqqqqqq" in error and len(error) < 400


def test_vocabulary_byte_cap_and_label_cap_are_settings(make_client):
    client = make_client(MASKINV_MAX_VOCAB_BYTES="100", MASKINV_MAX_LABEL_CHARS="12")
    labels = [f"label-{i:05d}" for i in range(20)]  # 11 characters each, 220 bytes
    resp = predict(client, "rectangle", [task(1)], context={"result": [rect("a")]}, maskinv={"labels": labels})
    assert resp.status_code == 400 and "MASKINV_MAX_VOCAB_BYTES=100" in resp.get_json()["error"]
    resp = predict(client, "rectangle", [task(1)], context={"result": [rect("a")]},
                   maskinv={"labels": ["car", "a much longer label"]})
    assert resp.status_code == 400 and "'a much longer label'" in resp.get_json()["error"]
    assert "MASKINV_MAX_LABEL_CHARS=12" in resp.get_json()["error"]
    resp = client.post("/setup", json={"schema": _config_with_label("x" * 13)})
    assert resp.status_code == 400 and "MASKINV_MAX_LABEL_CHARS=12" in resp.get_json()["error"]


def test_template_amplification_is_refused_without_formatting():
    from worker.protocol import InversionParams, PayloadError

    for template in ("{{}}{:x>40000000}", "{:>9999999}", "{!r:^99999}", "{0:{1}}"):
        with pytest.raises(PayloadError, match="template"):
            InversionParams.from_dict({"templates": [template]})


@pytest.mark.parametrize("template", ["{{}}{:x>4000}", "{}{}", "{} {x}", "{0}", "{.real}", "{[0]}", "{!s}", "{",
                                      "}", "no field", "{} }", "y" * 301 + "{}"])
def test_bad_templates_are_400_naming_the_template(make_client, template):
    client = make_client()
    resp = predict(client, "rectangle", [task(1)], context={"result": [rect("a")]},
                   maskinv={"templates": ["a photo of a {}.", template]})
    assert resp.status_code == 400, resp.get_json()
    error = resp.get_json()["error"]
    assert "template" in error and repr(template[:40] + ("..." if len(template) > 40 else "")) in error


def test_literal_braces_are_fine_and_become_single_braces(make_client):
    from worker.protocol import fill_template

    assert fill_template("{{a}} photo of a {}.", "cat") == "{a} photo of a cat."
    assert fill_template("a {}", "{0.__class__}") == "a {0.__class__}"  # the label is never a format string
    client = make_client()
    resp = predict(client, "rectangle", [task(1)], context={"result": [rect("a")]},
                   maskinv={"templates": ["{{brand}} a photo of a {}."], "labels": ["car", "{x}"]})
    assert resp.status_code == 200, resp.get_json()


# -- '..' refused in d= and filepath= without local roots ----------------------------------------

@pytest.mark.parametrize("path", [
    "/data/local-files/?d=../../etc/passwd",
    "/data/local-files/?d=photos/../../../etc/passwd",
    "/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd",
    "/data/local-files/?d=%252e%252e/etc/passwd",
    "/data/local-files/?d=..%5c..%5cetc%5cpasswd",
    "/data/local-files/?d=ok.png&d=../../etc/passwd",
    "/storage-data/uploaded/?filepath=../../etc/passwd",
    "/storage-data/uploaded/?filepath=upload/1/../../../etc/passwd",
    "/storage-data/uploaded/?filepath=%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
])
def test_traversal_in_query_is_refused_without_local_roots(sites, path):
    ls, _ = sites
    fetcher = ImageFetcher(ls.url, TOKEN)  # LOCAL_FILES_DOCUMENT_ROOT and MASKINV_MEDIA_ROOT unset
    with pytest.raises(ImageError, match=r"contains '\.\.'"):
        fetcher.fetch(path)
    assert ls.seen == []  # not forwarded to Label Studio (with the key)


def test_ordinary_query_paths_still_reach_label_studio(sites):
    ls, _ = sites
    fetcher = ImageFetcher(ls.url, TOKEN)
    assert fetcher.fetch("/data/local-files/?d=photos/a..b.png") == IMAGE
    assert fetcher.fetch("/storage-data/uploaded/?filepath=upload/1/x.png") == IMAGE
    assert len(ls.seen) == 2


# -- /health without credentials; path-free model_version ----------------------------------------

def test_health_without_credentials_says_only_up_and_ready(make_client):
    client = make_client(BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret")
    for route in ("/health", "/"):
        resp = client.get(route)
        assert resp.status_code == 200 and set(resp.get_json()) == {"status", "ready"}
        assert resp.get_json()["status"] == "UP"
        wrong = client.get(route, auth=("ann", "nope")).get_json()
        assert set(wrong) == {"status", "ready"}
        full = client.get(route, auth=("ann", "s3cret")).get_json()
        assert full["mode"] == "embedded" and "model" in full and full["model_class"] == "MaskInversionModel"
    open_client = make_client()  # auth off: details as before
    assert "mode" in open_client.get("/health").get_json()


def test_model_version_is_short_and_names_no_path():
    from backend.service import short_model_id

    assert short_model_id({"id": "ViT-B-16/openai"}) == "ViT-B-16/openai"
    assert short_model_id({"id": "maskinv-test-tiny/random-seed0"}) == "maskinv-test-tiny/random-seed0"
    assert short_model_id({"id": "scene/sha256-0123456789abcdef"}) == "scene/sha256-0123456789abcdef"
    legacy = short_model_id({"name": "scene", "id": "scene//home/ann/ckpt/model.pt:123:abcdef"})
    assert legacy.startswith("scene/id-") and "/home" not in legacy and len(legacy) < 40


def test_checkpoint_identity_is_its_content_not_its_path(tmp_path):
    from worker.engine.models import _checkpoint_identity

    a = tmp_path / "one" / "weights.pt"
    a.parent.mkdir()
    a.write_bytes(b"\x01" * 3000 + b"weights")
    b = tmp_path / "elsewhere.pt"
    shutil.copy(a, b)
    c = tmp_path / "changed.pt"
    c.write_bytes(b"\x01" * 3000 + b"Weights")
    assert _checkpoint_identity(a) == _checkpoint_identity(b) != _checkpoint_identity(c)
    assert str(tmp_path) not in _checkpoint_identity(a) and len(_checkpoint_identity(a)) <= 24


# -- the URL-keyed image cache expires ------------------------------------------------------------

def test_image_cache_entries_expire_after_the_ttl(sites):
    site, _ = sites
    now = [1000.0]
    fetcher = ImageFetcher(None, None, allowed_hosts=parse_allow_list("127.0.0.1"), cache_ttl_s=60.0,
                           clock=lambda: now[0])
    url = f"{site.url}/img.png"
    assert fetcher.fetch(url) == IMAGE
    site.body = OTHER_IMAGE  # the file is replaced at the same URL
    now[0] += 30
    assert fetcher.fetch(url) == IMAGE and len(site.seen) == 1  # within the TTL: served from the cache
    now[0] += 31
    assert fetcher.fetch(url) == OTHER_IMAGE and len(site.seen) == 2  # expired: fetched again
    assert fetcher._cache.bytes == sum(len(k) + len(v) for k, v in fetcher._cache.items())


def test_ttl_is_a_setting():
    from backend.settings import Settings, SettingsError

    assert Settings.from_env({}).image_cache_ttl_s == 300.0
    assert Settings.from_env({"MASKINV_IMAGE_CACHE_TTL": "5"}).image_cache_ttl_s == 5.0
    with pytest.raises(SettingsError, match="MASKINV_IMAGE_CACHE_TTL"):
        Settings.from_env({"MASKINV_IMAGE_CACHE_TTL": "-1"})


def test_the_connection_itself_refuses_to_carry_the_key_elsewhere(sites, monkeypatch):
    """Defence in depth: even if the routing decision were wrong, the connection compares its own scheme, host
    and port with the Label Studio origin before the headers go out."""
    from backend.images.policy import Route

    ls, other = sites
    fetcher = ImageFetcher(ls.url, TOKEN, allowed_hosts=parse_allow_list(f"127.0.0.1:{other.port}"))
    real_route = fetcher.policy.route

    def wrong_route(url, setup_host=None, credential_origin=None):
        r = real_route(url, setup_host, credential_origin)
        return Route(r.origin, r.url, credential_origin is not None)  # "everything is Label Studio"

    monkeypatch.setattr(fetcher.policy, "route", wrong_route)
    with pytest.raises(ImageError, match="refusing to send the Label Studio credential"):
        fetcher.fetch(f"{other.url}/img.png")
    assert other.seen == []


def test_absolute_label_studio_urls_with_traversal_are_refused_too(sites):
    """The same paths spelled as absolute URLs of the Label Studio origin (they would carry the key)."""
    ls, _ = sites
    fetcher = ImageFetcher(ls.url, TOKEN)
    for path in ("/data/local-files/?d=../../etc/passwd", "/data/upload/../../api/projects",
                 "/storage-data/uploaded/?filepath=%252e%252e/x"):
        with pytest.raises(ImageError, match=r"contains '\.\.'"):
            fetcher.fetch(ls.url + path)
    assert ls.seen == []


def test_label_studio_url_must_parse_unambiguously():
    from backend.settings import Settings, SettingsError

    for bad in ("http://ls:8080\\@evil:80", "http://user@ls:8080", "http://ls\t:8080"):
        with pytest.raises(SettingsError, match="LABEL_STUDIO_URL"):
            Settings.from_env({"LABEL_STUDIO_URL": bad})
    assert Settings.from_env({"LABEL_STUDIO_URL": "http://ls:8080/"}).label_studio_url == "http://ls:8080"
