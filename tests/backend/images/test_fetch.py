"""Task images: Label Studio URL conventions and authentication (legacy token, JWT refresh -> Bearer access).

A small local HTTP server stands in for the Label Studio host's file and token endpoints only.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest

from backend.images.policy import parse_allow_list
from backend.images.fetch import ImageError, ImageFetcher, image_size
from backend_support import data_uri, png_bytes

IMAGE = png_bytes(32, 24, seed=5)
LEGACY = "0123456789abcdef0123456789abcdef01234567"
SECRET = "maskinv-test-secret-0123456789abcdef"  # >= 32 bytes for HS256


def make_jwt(token_type: str, ttl: float) -> str:
    return jwt.encode({"token_type": token_type, "exp": int(time.time() + ttl), "user_id": 1}, SECRET,
                      algorithm="HS256")


class FakeLabelStudio(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
    refresh_token = make_jwt("refresh", 3600)

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _authorised(self) -> bool:
        auth = self.headers.get("Authorization") or ""
        if auth == f"Token {LEGACY}":
            return True
        if auth.startswith("Bearer "):
            try:
                claims = jwt.decode(auth[7:], SECRET, algorithms=["HS256"])
            except jwt.PyJWTError:
                return False
            return claims.get("token_type") == "access"
        return False

    def do_GET(self):
        self.seen.append(("GET", self.path, self.headers.get("Authorization")))
        if self.path.startswith("/slow"):
            time.sleep(2)
        if self.path.startswith("/public/"):
            return self._send(200, IMAGE, "image/png")
        if self.path.startswith(("/data/upload/", "/storage-data/uploaded/")):
            if not self._authorised():
                return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
            if self.path.startswith("/storage-data/"):
                return self._send(404, b"{}")  # FileSystemStorage without the proxy: the SDK falls back
            return self._send(200, IMAGE, "image/png")
        return self._send(404, b"{}")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.seen.append(("POST", self.path, None))
        if self.path == "/api/token/refresh" and body.get("refresh") == self.refresh_token:
            return self._send(200, json.dumps({"access": make_jwt("access", 300)}).encode())
        return self._send(401, b'{"detail": "Token is invalid"}')

    def _send(self, status: int, body: bytes, ctype: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # clients that gave up (timeouts) are expected here
        pass


@pytest.fixture(scope="module")
def fake_ls():
    server = _QuietServer(("127.0.0.1", 0), FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(autouse=True)
def clear_seen():
    FakeLabelStudio.seen.clear()


def test_legacy_token_is_sent_as_token(fake_ls):
    fetcher = ImageFetcher(fake_ls, LEGACY)
    assert fetcher.auth.kind == "legacy"
    assert fetcher.fetch("/data/upload/1/a.png") == IMAGE
    assert ("GET", "/data/upload/1/a.png", f"Token {LEGACY}") in FakeLabelStudio.seen
    n = len(FakeLabelStudio.seen)
    assert fetcher.fetch("/data/upload/1/a.png") == IMAGE  # served from the LRU
    assert len(FakeLabelStudio.seen) == n


def test_refresh_token_is_exchanged_for_a_bearer_access_token(fake_ls):
    fetcher = ImageFetcher(fake_ls, FakeLabelStudio.refresh_token)
    assert fetcher.auth.kind == "refresh"
    assert fetcher.fetch("/data/upload/1/a.png") == IMAGE
    assert fetcher.fetch("/data/upload/1/b.png") == IMAGE
    refreshes = [s for s in FakeLabelStudio.seen if s[:2] == ("POST", "/api/token/refresh")]
    assert len(refreshes) == 1  # the access token is reused until it nearly expires
    gets = [s for s in FakeLabelStudio.seen if s[0] == "GET"]
    assert gets and all(auth.startswith("Bearer ") for _, _, auth in gets)


def test_bad_keys_give_clear_errors(fake_ls):
    with pytest.raises(ImageError, match=r"HTTP 401 \(check LABEL_STUDIO_API_KEY\)"):
        ImageFetcher(fake_ls, "wrong-legacy-key").fetch("/data/upload/1/a.png")
    with pytest.raises(ImageError, match="refused the refresh token"):
        ImageFetcher(fake_ls, make_jwt("refresh", 60)).fetch("/data/upload/1/a.png")  # not the one LS knows
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        ImageFetcher(None, None).fetch("/data/upload/1/a.png")


def test_setup_hostname_and_token_are_fallbacks(fake_ls):
    # a /setup hostname is not trusted with private addresses (anyone reaching /setup could send one) ...
    with pytest.raises(ImageError, match="loopback address.*MASKINV_ALLOWED_HOSTS"):
        ImageFetcher(None, None).fetch("/data/upload/1/a.png", hostname=fake_ls, fallback_token=LEGACY)
    # ... unless the address is allow-listed
    fetcher = ImageFetcher(None, None, allowed_hosts=parse_allow_list("127.0.0.1"))
    assert fetcher.fetch("/data/upload/1/a.png", hostname=fake_ls, fallback_token=LEGACY) == IMAGE
    assert FakeLabelStudio.seen[-1] == ("GET", "/data/upload/1/a.png", f"Token {LEGACY}")


def test_api_key_is_never_sent_to_a_setup_hostname(fake_ls):
    """LABEL_STUDIO_API_KEY belongs to LABEL_STUDIO_URL: with that unset, a /setup hostname gets only /setup's token."""
    fetcher = ImageFetcher(None, LEGACY, allowed_hosts=parse_allow_list("127.0.0.1"))
    with pytest.raises(ImageError, match="no token .LABEL_STUDIO_API_KEY is only sent to LABEL_STUDIO_URL"):
        fetcher.fetch("/data/upload/1/a.png", hostname=fake_ls)
    assert FakeLabelStudio.seen == []


def test_foreign_hosts_get_no_credentials(fake_ls):
    other_host = fake_ls.replace("127.0.0.1", "localhost")
    fetcher = ImageFetcher(fake_ls, LEGACY, allowed_hosts=parse_allow_list("localhost"))
    assert fetcher.fetch(f"{other_host}/public/x.png") == IMAGE
    assert FakeLabelStudio.seen[-1] == ("GET", "/public/x.png", None)


def test_timeouts_and_missing_files(fake_ls):
    with pytest.raises(ImageError, match="(?i)timeout|timed out"):
        ImageFetcher(fake_ls, LEGACY, timeout_s=0.3).fetch(f"{fake_ls}/slow/x.png")
    with pytest.raises(ImageError, match="HTTP 404"):
        ImageFetcher(fake_ls, LEGACY).fetch(f"{fake_ls}/missing.png")


def test_local_files_are_read_from_the_document_root(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.png").write_bytes(IMAGE)
    assert ImageFetcher(None, None, local_files_root=str(tmp_path)).fetch("/data/local-files/?d=photos/x.png") == IMAGE


def test_data_uris_and_limits():
    fetcher = ImageFetcher(None, None, max_bytes=len(IMAGE) + 10)
    assert fetcher.fetch(data_uri(IMAGE)) == IMAGE
    with pytest.raises(ImageError, match="base64"):
        fetcher.fetch("data:image/png,rawbytes")
    with pytest.raises(ImageError, match="more than MASKINV_MAX_IMAGE_MB"):
        fetcher.fetch(data_uri(IMAGE + b"\0" * 100))
    with pytest.raises(ImageError, match="no image URL"):
        fetcher.fetch(None)


def test_image_size_applies_exif_orientation():
    from io import BytesIO

    from PIL import Image

    img = Image.new("RGB", (30, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as 20 x 30
    buf = BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert image_size(buf.getvalue()) == (20, 30)
    assert image_size(IMAGE) == (32, 24)
    with pytest.raises(ImageError, match="cannot be decoded"):
        image_size(b"nope")


def test_image_lru_keys_data_uris_by_digest_and_counts_keys_against_its_bound():
    """A data: URI is about 4/3 of its image: keeping it as the key would hold twice the bytes the bound says."""
    fetcher = ImageFetcher(None, None, cache_bytes=3 * len(IMAGE) + 400)
    uris = [data_uri(IMAGE + bytes([i])) for i in range(6)]
    for uri in uris:
        fetcher.fetch(uri)
    assert all(len(k) < 80 and k.startswith("data:sha256:") for k in fetcher._cache.keys())
    assert fetcher._cache.bytes == sum(len(k) + len(v) for k, v in fetcher._cache.items()) <= fetcher.cache_bytes
    assert len(fetcher._cache) == 3  # the three most recent images fit, the older ones were evicted
    assert fetcher.fetch(uris[-1]) == IMAGE + bytes([5])  # a hit, by digest
    assert ImageFetcher.cache_key(uris[0]) != ImageFetcher.cache_key(uris[1])
