"""Image sources an attacker might name in task data: SSRF, redirects, credentials, local paths, size and time.

Only loopback servers are used; where a test needs one to be reachable, 127.0.0.1 (or a name the test's own
resolver maps to it) is allow-listed explicitly.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from backend.images.policy import FetchPolicy, FetchRefused, parse_allow_list, parse_entry, safe_local_path
from backend.images.fetch import ImageError, ImageFetcher
from backend_support import data_uri, png_bytes

pytestmark = pytest.mark.hardening

IMAGE = png_bytes(24, 16, seed=3)
TOKEN = "0123456789abcdef0123456789abcdef01234567"


class Handler(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str | None]] = []  # (host header, path, Authorization)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append((self.headers.get("Host"), self.path, self.headers.get("Authorization")))
        path, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
        if path == "/img.png" or path.startswith("/data/"):
            return self._send(200, IMAGE, "image/png")
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 20))
            self.end_headers()
            return None
        if path == "/big-chunked":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(64):
                    chunk = b"\0" * 65536
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the client hung up: expected
            return None
        if path == "/gzip-bomb":  # 100 KB on the wire, 64 MiB decoded
            body = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass
            return None
        if path == "/drip":  # a byte every 0.2 s: each read is fast, the whole download is not
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return None
        return self._send(404, b"{}")

    def _send(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


@pytest.fixture(scope="module")
def server():
    srv = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv.server_address[1]
    srv.shutdown()


@pytest.fixture(autouse=True)
def clear_seen():
    Handler.seen.clear()


def fake_dns(mapping: dict[str, str]):
    """A getaddrinfo that resolves the given names (and IP literals) only."""
    def resolve(host, port, type=0, **_):
        ip = mapping.get(host, host)
        try:
            socket.inet_aton(ip)
        except OSError:
            raise socket.gaierror(f"unknown host {host}") from None
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
    return resolve


# -- the policy ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, host, port, ok", [
    ("images.example.com", "images.example.com", 443, True),
    ("images.example.com", "evil.example.com", 443, False),
    ("*.example.com", "a.b.example.com", 443, True),
    ("*.example.com", "example.com", 443, False),
    ("*.example.com", "example.com.evil.org", 443, False),
    ("127.0.0.1:8080", "127.0.0.1", 8080, True),
    ("127.0.0.1:8080", "127.0.0.1", 8081, False),
    ("[::1]:9000", "::1", 9000, True),
    ("10.0.0.0/8", "10.1.2.3", 80, True),
    ("10.0.0.0/8", "11.1.2.3", 80, False),
])
def test_allow_list_entries(text, host, port, ok):
    assert parse_entry(text).matches_host(host, port) is ok


@pytest.mark.parametrize("text", ["exa mple.com", "10.0.0.0/33", "[::1", "host:99999", "*."])
def test_bad_allow_list_entries_are_refused(text):
    with pytest.raises(ValueError):
        parse_allow_list(text)


def test_bad_allow_list_stops_the_server():
    from backend.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="MASKINV_ALLOWED_HOSTS"):
        Settings.from_env({"MASKINV_ALLOWED_HOSTS": "ok.example.com, 300.1.1.1/8"})
    s = Settings.from_env({"MASKINV_ALLOWED_HOSTS": "ok.example.com, 10.0.0.0/8"})
    assert [e.text for e in s.allowed_hosts] == ["ok.example.com", "10.0.0.0/8"]


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "0.0.0.0",
                                "100.64.0.1", "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
                                "::ffff:169.254.169.254"])
def test_non_public_addresses_are_refused(ip):
    policy = FetchPolicy(None, parse_allow_list("*.example.com"), resolver=fake_dns({"a.example.com": "0.0.0.0"}))
    assert not policy.address_allowed(__import__("ipaddress").ip_address(ip), "a.example.com", 443)


def test_public_addresses_and_allow_listed_networks_pass():
    import ipaddress

    policy = FetchPolicy("http://ls:8080", parse_allow_list("*.example.com, 10.9.0.0/16, minio"))
    assert policy.address_allowed(ipaddress.ip_address("93.184.216.34"), "a.example.com", 443)
    assert policy.address_allowed(ipaddress.ip_address("10.9.3.4"), "a.example.com", 443)  # CIDR entry
    assert policy.address_allowed(ipaddress.ip_address("172.18.0.5"), "ls", 8080)  # LABEL_STUDIO_URL's host
    assert policy.address_allowed(ipaddress.ip_address("172.18.0.6"), "minio", 9000)  # exact host entry
    assert not policy.address_allowed(ipaddress.ip_address("172.18.0.7"), "b.example.com", 443)  # wildcard


def test_wildcard_host_resolving_to_loopback_is_refused_at_connect_time(server):
    """DNS rebinding: a host the allow-list admits by wildcard must not reach a private address."""
    url, port = server
    dns = fake_dns({"img.example.test": "127.0.0.1", "exact.example.test": "127.0.0.1"})
    wildcard = ImageFetcher(None, None, policy=FetchPolicy(None, parse_allow_list("*.example.test"), resolver=dns))
    with pytest.raises(ImageError, match="resolves to loopback address.*MASKINV_ALLOWED_HOSTS"):
        wildcard.fetch(f"http://img.example.test:{port}/img.png")
    assert Handler.seen == []  # never connected
    exact = ImageFetcher(None, None, policy=FetchPolicy(None, parse_allow_list("exact.example.test"), resolver=dns))
    assert exact.fetch(f"http://exact.example.test:{port}/img.png") == IMAGE  # named explicitly: trusted


def test_unlisted_hosts_are_refused_before_any_connection(server):
    url, port = server
    fetcher = ImageFetcher(None, None)
    for target in (f"{url}/img.png", f"http://localhost:{port}/img.png", "http://169.254.169.254/latest/meta-data/",
                   f"http://2130706433:{port}/img.png", f"http://[::ffff:127.0.0.1]:{port}/img.png"):
        with pytest.raises(ImageError, match="refused image source: image host .* is not allowed"):
            fetcher.fetch(target)
    assert Handler.seen == []


def test_allow_listed_loopback_is_fetched(server):
    url, _ = server
    assert ImageFetcher(None, None, allowed_hosts=parse_allow_list("127.0.0.1")).fetch(f"{url}/img.png") == IMAGE


@pytest.mark.parametrize("target, match", [
    ("file:///etc/passwd", "scheme file: is not allowed"),
    ("FILE:///etc/passwd", "scheme file: is not allowed"),
    ("ftp://127.0.0.1/x.png", "scheme ftp: is not allowed"),
    ("gopher://127.0.0.1:6379/_INFO", "scheme gopher: is not allowed"),
    ("/etc/passwd", "unsupported image URL"),
    ("//evil.example.com/x.png", "unsupported image URL"),
    ("../../etc/passwd", "unsupported image URL"),
    ("/data/upload/../../api/projects", "contains '..'"),
    ("/data/upload/%2e%2e/%2e%2e/api/projects", "contains '..'"),
    ("/data/local-files/?d=../../etc/passwd", "contains '..'"),
])
def test_schemes_and_paths_are_refused(target, match, server):
    url, _ = server
    fetcher = ImageFetcher(url, TOKEN, local_files_root="/tmp")
    with pytest.raises(ImageError, match=match):
        fetcher.fetch(target)
    assert Handler.seen == []


# -- redirects and credentials --------------------------------------------------------------------------

def test_redirects_are_checked_again(server):
    url, port = server
    fetcher = ImageFetcher(None, None, allowed_hosts=parse_allow_list("127.0.0.1"))
    assert fetcher.fetch(f"{url}/redirect?to=/img.png") == IMAGE  # same allowed host
    for target in (f"http://localhost:{port}/img.png", "http://169.254.169.254/latest/meta-data/",
                   "file:///etc/passwd"):
        Handler.seen.clear()
        with pytest.raises(ImageError, match="refused image source"):
            fetcher.fetch(f"{url}/redirect?to={target}")
        assert [p for _, p, _ in Handler.seen] == [f"/redirect?to={target}"]  # the redirect target is not fetched


def test_too_many_redirects():
    fetcher = ImageFetcher(None, None, allowed_hosts=parse_allow_list("127.0.0.1"))
    srv = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        loop = f"{base}/redirect?to={base}/redirect?to={base}/redirect?to={base}/redirect?to={base}/redirect?to=" \
               f"{base}/redirect?to={base}/img.png"
        with pytest.raises(ImageError, match="more than 5 redirects"):
            fetcher.fetch(loop)
    finally:
        srv.shutdown()


def test_label_studio_token_never_leaves_its_origin(server):
    """The API key goes to LABEL_STUDIO_URL only: not to a redirect target, not to allow-listed hosts."""
    url, port = server
    other = f"http://localhost:{port}"
    fetcher = ImageFetcher(url, TOKEN, allowed_hosts=parse_allow_list("localhost"))
    assert fetcher.fetch("/data/upload/1/a.png") == IMAGE
    assert fetcher.fetch(f"{url}/redirect?to={other}/img.png") == IMAGE
    assert fetcher.fetch(f"{other}/img.png") == IMAGE
    to_ls = [a for host, path, a in Handler.seen if host.startswith("127.0.0.1") and "upload" in path]
    to_others = [a for host, _, a in Handler.seen if host.startswith("localhost")]
    assert to_ls and all(a == f"Token {TOKEN}" for a in to_ls)
    assert len(to_others) == 2 and all(a is None for a in to_others)


# -- local files ----------------------------------------------------------------------------------------

def test_local_roots_refuse_traversal_and_symlinks_out(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret"
    (root / "photos").mkdir(parents=True)
    outside.mkdir()
    (outside / "key.png").write_bytes(IMAGE)
    (root / "photos" / "ok.png").write_bytes(IMAGE)
    (root / "photos" / "link-out.png").symlink_to(outside / "key.png")
    (root / "photos" / "dir-out").symlink_to(outside)
    (root / "photos" / "link-in.png").symlink_to(root / "photos" / "ok.png")
    fetcher = ImageFetcher(None, None, local_files_root=str(root))
    assert fetcher.fetch("/data/local-files/?d=photos/ok.png") == IMAGE
    assert fetcher.fetch("/data/local-files/?d=/photos/link-in.png") == IMAGE  # leading '/' is relative, as in LS
    for rel, match in (("photos/link-out.png", "leaves its root"), ("photos/dir-out/key.png", "leaves its root"),
                       ("photos/../../secret/key.png", "contains '..'")):
        with pytest.raises(ImageError, match=match):
            fetcher.fetch(f"/data/local-files/?d={rel}")
    with pytest.raises(FetchRefused, match="NUL"):
        safe_local_path(root, "photos/ok.png\0.jpg", "test")


def test_uploads_are_read_from_the_media_root_without_asking_label_studio(tmp_path, server):
    url, _ = server
    (tmp_path / "upload" / "3").mkdir(parents=True)
    (tmp_path / "upload" / "3" / "x.png").write_bytes(IMAGE)
    fetcher = ImageFetcher(url, TOKEN, media_root=str(tmp_path))
    assert fetcher.fetch("/data/upload/3/x.png") == IMAGE
    assert fetcher.fetch("/storage-data/uploaded/?filepath=upload/3/x.png") == IMAGE
    assert Handler.seen == []
    assert fetcher.fetch("/data/upload/3/missing.png") == IMAGE  # not on disk: asked from Label Studio
    assert len(Handler.seen) == 1


# -- size and time --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/big-declared", "/big-chunked", "/gzip-bomb"])
def test_byte_cap_holds_while_downloading(server, path):
    url, _ = server
    fetcher = ImageFetcher(None, None, max_bytes=1 << 20, allowed_hosts=parse_allow_list("127.0.0.1"))
    with pytest.raises(ImageError, match="larger than MASKINV_MAX_IMAGE_MB"):
        fetcher.fetch(f"{url}{path}")


def test_a_trickling_server_cannot_hold_a_fetch_past_its_timeout(server):
    url, _ = server
    fetcher = ImageFetcher(None, None, timeout_s=1.0, allowed_hosts=parse_allow_list("127.0.0.1"))
    with pytest.raises(ImageError, match="took longer than MASKINV_FETCH_TIMEOUT"):
        fetcher.fetch(f"{url}/drip")


def test_request_deadline_bounds_the_fetch(server):
    url, _ = server
    fetcher = ImageFetcher(None, None, timeout_s=30.0, allowed_hosts=parse_allow_list("127.0.0.1"))
    with pytest.raises(ImageError, match="took longer than MASKINV_FETCH_TIMEOUT"):
        fetcher.fetch(f"{url}/drip", deadline=time.monotonic() + 0.5)


def test_data_uri_limits():
    fetcher = ImageFetcher(None, None, max_bytes=len(IMAGE))
    assert fetcher.fetch(data_uri(IMAGE)) == IMAGE
    with pytest.raises(ImageError, match="MASKINV_MAX_IMAGE_MB"):
        fetcher.fetch(data_uri(IMAGE + b"\0"))
