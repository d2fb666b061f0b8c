"""Task images -> bytes, the way Label Studio serves them, within the fetch policy (:mod:`backend.images.policy`).

Label Studio URL conventions are resolved by label-studio-sdk's ``get_base64_content`` (LS 1.23:
``/data/upload/...``, ``/storage-data/uploaded/...``, ``/data/local-files/?d=...``, cloud URIs through
``/tasks/<id>/presign/``, plain http(s) URLs); ``data:`` URIs are decoded here. All network access goes through
:class:`GuardedSession`, which

* checks every URL, redirect hops included, against the policy (host allow-list, http/https only) and every
  TCP connection's address (no private/loopback/link-local address unless trusted or allow-listed);
* sends the Label Studio credentials only to the Label Studio origin they belong to (never to another host,
  never the API key to a host that merely came from ``/setup``), and ignores proxy/netrc settings;
* streams bodies with a byte cap (``MASKINV_MAX_IMAGE_MB``, checked before decompressed data piles up) and a
  total time limit per image (``MASKINV_FETCH_TIMEOUT``, also against servers that trickle bytes).

Local files are read here, before the SDK, under the configured roots only (``LOCAL_FILES_DOCUMENT_ROOT`` for
``/data/local-files/?d=``, ``MASKINV_MEDIA_ROOT`` for uploads), with ``..`` and symlinks out of the root
refused; a file that is not there is asked from Label Studio.

Requests to the Label Studio host carry the API key: a legacy token as ``Authorization: Token <key>``; a
personal access token (a JWT *refresh* token, LS >= 1.14) is exchanged at ``/api/token/refresh`` for a
short-lived access token, sent as ``Authorization: Bearer <access>`` and renewed before it expires.

Fetched bytes are kept in a small LRU keyed by URL whose entries expire after ``MASKINV_IMAGE_CACHE_TTL``
seconds (a file replaced at the same URL is read again); the worker's caches are keyed by the bytes' SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import requests
import urllib3
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from backend.bounded_cache import BoundedCache
from backend.images.policy import (DEFAULT_PORTS, FetchPolicy, FetchRefused, HostEntry, Origin, Route, has_traversal,
                           normalise_host, safe_local_path, sends_credential)

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024
#: URL prefixes Label Studio uses for files it serves itself (resolved against its host)
LS_PATH_PREFIXES = ("/data/", "data/", "/storage-data/", "storage-data/", "/upload/", "upload/")
CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")


class ImageError(ValueError):
    """The task's image cannot be fetched or decoded, or may not be; the message says which and why.

    ``upstream``: the image host or Label Studio failed (unreachable, HTTP error, too slow) -> HTTP 502; otherwise
    the request named an image this backend will not or cannot read (refused source, no URL, too large, not an
    image) -> HTTP 422.
    """

    def __init__(self, message: str, upstream: bool = False):
        super().__init__(message)
        self.upstream = upstream


# -- guarded HTTP ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _FetchContext:
    auth_origin: Origin | None  # where the Authorization header may go
    auth_header: str | None
    setup_host: str | None  # /setup hostname (allowed host, untrusted addresses)
    deadline: float  # time.monotonic() by which the whole fetch must be done


_context: ContextVar[_FetchContext | None] = ContextVar("maskinv_fetch_context", default=None)


def _connect(conn: HTTPConnection, policy: FetchPolicy):
    """Open the TCP connection of ``conn`` to an address the policy allows (checked at connect time)."""
    try:
        addresses = policy.resolve(conn.host, conn.port)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    error: Exception | None = None
    for _, ip in addresses:
        try:
            return urllib3.util.connection.create_connection(
                (ip, conn.port), conn.timeout, source_address=conn.source_address,
                socket_options=conn.socket_options)
        except socket.timeout:
            error = ConnectTimeoutError(conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})")
        except OSError as exc:
            error = NewConnectionError(conn, f"Failed to establish a new connection: {exc}")
    assert error is not None
    raise error


def _guard_credential(conn: HTTPConnection, scheme: str, headers: Any) -> None:
    """Last check before a request's headers go on the wire: an ``Authorization`` header is sent only on a
    connection whose own scheme, host and port are the Label Studio origin the credential belongs to."""
    if not headers or not any(str(k).lower() == "authorization" for k in headers):
        return
    ctx = _context.get()
    origin = Origin(scheme, normalise_host(conn.host), int(conn.port or DEFAULT_PORTS[scheme]))
    if ctx is None or not sends_credential(origin, ctx.auth_origin if ctx.auth_header else None):
        raise FetchRefused(f"refusing to send the Label Studio credential to {origin.host}:{origin.port}: "
                           "it is not the Label Studio origin")


def _pool_classes(policy: FetchPolicy) -> dict[str, type]:
    class _Conn(HTTPConnection):
        def _new_conn(self):
            return _connect(self, policy)

        def request(self, method, url, body=None, headers=None, **kwargs):
            _guard_credential(self, "http", headers)
            return super().request(method, url, body=body, headers=headers, **kwargs)

    class _TLSConn(HTTPSConnection):
        def _new_conn(self):
            return _connect(self, policy)

        def request(self, method, url, body=None, headers=None, **kwargs):
            _guard_credential(self, "https", headers)
            return super().request(method, url, body=body, headers=headers, **kwargs)

    class _Pool(HTTPConnectionPool):
        ConnectionCls = _Conn

    class _TLSPool(HTTPSConnectionPool):
        ConnectionCls = _TLSConn

    return {"http": _Pool, "https": _TLSPool}


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, policy: FetchPolicy, **kwargs: Any):
        self._classes = _pool_classes(policy)
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self._classes)


class GuardedSession(requests.Session):
    """A requests session that enforces the fetch policy, the byte cap and the time limit (module docstring)."""

    def __init__(self, policy: FetchPolicy, timeout_s: float, max_bytes: int):
        super().__init__()
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.trust_env = False  # no proxies or .netrc credentials from the environment
        for prefix in ("http://", "https://"):
            self.mount(prefix, _GuardedAdapter(policy))

    def request(self, method, url, **kwargs):  # type: ignore[override]
        """GET/POST ``url`` within the policy; every hop (redirects included) is routed by
        :meth:`FetchPolicy.route` on the same strictly parsed URL that the connection is opened for."""
        ctx = _context.get() or _FetchContext(None, None, None, time.monotonic() + self.timeout_s)
        deadline = min(ctx.deadline, time.monotonic() + self.timeout_s)
        headers = {k: v for k, v in (kwargs.pop("headers", None) or {}).items() if k.lower() != "authorization"}
        verify = kwargs.pop("verify", True)
        if verify is True:
            verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        for ignored in ("allow_redirects", "stream", "timeout", "proxies", "auth"):
            kwargs.pop(ignored, None)
        params, data, json_body = kwargs.pop("params", None), kwargs.pop("data", None), kwargs.pop("json", None)
        cert = kwargs.pop("cert", None)
        if kwargs:
            raise TypeError(f"GuardedSession.request: unsupported arguments {sorted(kwargs)}")
        credential_origin = ctx.auth_origin if ctx.auth_header else None
        for _ in range(MAX_REDIRECTS + 1):
            route = self.policy.route(url, ctx.setup_host, credential_origin)  # refuses ambiguous URLs
            prep = self.prepare_request(requests.Request(method, url, headers=headers, params=params, data=data,
                                                         json=json_body))
            params = None  # now part of the URL
            # the URL urllib3 connects to is prep.url: it must route exactly like the URL decided on
            prepared_url = str(prep.url)
            if self.policy.route(prepared_url, ctx.setup_host, credential_origin) != Route(route.origin, prepared_url,
                                                                                            route.credential):
                raise FetchRefused(f"URL {url[:200]!r} changes its host when prepared ({prepared_url[:200]!r})")
            prep.headers.pop("Authorization", None)
            if route.credential and ctx.auth_header:
                prep.headers["Authorization"] = ctx.auth_header
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageError(f"fetching {url[:200]} took longer than MASKINV_FETCH_TIMEOUT / the request "
                                 "deadline", upstream=True)
            resp = self.send(prep, allow_redirects=False, stream=True, timeout=(remaining, remaining),
                             verify=verify, cert=cert, proxies={})
            if not resp.is_redirect:
                _read_capped(resp, self.max_bytes, deadline, url)
                return resp
            target = urljoin(resp.url, resp.headers.get("location", ""))
            resp.close()
            log.debug("redirect %s -> %s", url[:200], target[:200])
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method.upper() == "POST"):
                method, data, json_body = "GET", None, None
            url = target
        raise ImageError(f"more than {MAX_REDIRECTS} redirects fetching {url[:200]}")


def _read_capped(resp: requests.Response, max_bytes: int, deadline: float, url: str) -> None:
    """Read ``resp``'s body into ``resp._content``: at most ``max_bytes`` (decoded), by ``deadline``."""
    try:
        declared = int(resp.headers.get("Content-Length") or -1)
    except ValueError:
        declared = -1
    too_big = (f"image {url[:120]} is larger than MASKINV_MAX_IMAGE_MB allows ({max_bytes} bytes); "
               "refused while downloading")
    try:
        if declared > max_bytes:
            raise ImageError(too_big)
        buf = bytearray()
        raw = resp.raw
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageError(f"downloading {url[:200]} took longer than MASKINV_FETCH_TIMEOUT "
                                 f"(or the request deadline); {len(buf)} bytes received", upstream=True)
            sock = getattr(getattr(raw, "connection", None), "sock", None)
            if sock is not None:
                sock.settimeout(remaining)  # one read waits at most until the deadline
            chunk = raw.read1(CHUNK_BYTES, decode_content=True)
            if not chunk:
                break
            buf += chunk
            if len(buf) > max_bytes:
                raise ImageError(too_big)
        resp._content = bytes(buf)  # what .content / .text then return
        setattr(resp, "_content_consumed", True)  # a private flag the typing of requests does not declare
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ImageError(f"cannot download image {url[:200]}: {exc.__class__.__name__}: {exc}",
                         upstream=True) from None
    finally:
        resp.close()


# -- Label Studio credentials ---------------------------------------------------------------------------

def _jwt_claims(token: str) -> dict[str, Any] | None:
    """Unverified JWT claims, or None when ``token`` is not a JWT."""
    import jwt

    try:
        return jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None


def authorization_header(token: str) -> str:
    """``Bearer <jwt>`` for a JWT, else ``Token <key>`` (Label Studio's two schemes)."""
    return ("Bearer " if _jwt_claims(token) is not None else "Token ") + token


class LabelStudioAuth:
    """Turns LABEL_STUDIO_API_KEY (legacy token or JWT refresh token) into the token to present."""

    def __init__(self, base_url: str | None, api_key: str | None, session: requests.Session):
        self.base_url = base_url
        self.api_key = api_key
        self.session = session
        self._access: str | None = None
        self._access_exp = 0.0
        self._lock = threading.Lock()
        claims = _jwt_claims(api_key) if api_key else None
        self.kind = "none" if not api_key else ("legacy" if claims is None else
                                                 "refresh" if claims.get("token_type") == "refresh" else "access")

    def token(self) -> str | None:
        """Legacy key (-> "Token"), or a valid access JWT (-> "Bearer"), or None."""
        if self.kind != "refresh":
            return self.api_key
        with self._lock:
            if self._access is None or time.time() > self._access_exp - 30:
                self._refresh()
            return self._access

    def _refresh(self) -> None:
        if not self.base_url:
            raise ImageError("LABEL_STUDIO_API_KEY is a refresh token but LABEL_STUDIO_URL is not set")
        url = f"{self.base_url}/api/token/refresh"
        try:
            resp = self.session.post(url, json={"refresh": self.api_key})
        except requests.RequestException as exc:
            raise ImageError(f"cannot exchange the Label Studio refresh token at {url}: {exc}",
                             upstream=True) from None
        if resp.status_code != 200:
            raise ImageError(f"Label Studio refused the refresh token at {url}: HTTP {resp.status_code} "
                             f"{resp.text[:200]!r} (is LABEL_STUDIO_API_KEY a valid personal access token?)",
                             upstream=True)
        try:
            access = resp.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise ImageError(f"unexpected answer from {url}: {resp.text[:200]!r}", upstream=True) from None
        claims = _jwt_claims(access) or {}
        self._access = access
        self._access_exp = float(claims.get("exp") or time.time() + 60)
        log.info("obtained a Label Studio access token (valid for %.0fs)", self._access_exp - time.time())


# -- the fetcher -------------------------------------------------------------------------------------

class ImageFetcher:
    """Fetch task images within the fetch policy (with an LRU of recent ones)."""

    def __init__(self, label_studio_url: str | None, api_key: str | None, timeout_s: float = 30.0,
                 max_bytes: int = 64 << 20, cache_bytes: int = 256 << 20, allowed_hosts: tuple[HostEntry, ...] = (),
                 local_files_root: str | None = None, media_root: str | None = None,
                 policy: FetchPolicy | None = None, cache_ttl_s: float = 300.0, clock=time.monotonic):
        self.label_studio_url = label_studio_url
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.cache_bytes = cache_bytes
        self.local_files_root = local_files_root
        self.media_root = media_root
        self.policy = policy or FetchPolicy(label_studio_url, allowed_hosts)
        self.session = GuardedSession(self.policy, timeout_s, max_bytes)
        self.auth = LabelStudioAuth(label_studio_url, api_key, self.session)
        self.cache_ttl_s = cache_ttl_s  # MASKINV_IMAGE_CACHE_TTL: a URL's bytes are reused this long at most
        self._clock = clock
        # URL key -> image bytes; keys and bytes both count against MASKINV_IMAGE_CACHE_MB
        self._cache: BoundedCache[str, bytes] = BoundedCache(None, cache_bytes, lambda k, v: len(k) + len(v),
                                                             ttl_s=cache_ttl_s, clock=clock)

    def fetch(self, url: Any, task_id: int | None = None, hostname: str | None = None,
              fallback_token: str | None = None, deadline: float | None = None) -> bytes:
        """Image bytes for a task's image URL; raises :class:`ImageError` with the reason.

        ``hostname`` / ``fallback_token`` come from Label Studio's ``/setup`` call and are used only when
        LABEL_STUDIO_URL is not set. ``deadline`` (``time.monotonic()``) bounds the whole fetch besides
        MASKINV_FETCH_TIMEOUT.
        """
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"the task has no image URL (got {str(url)[:100]!r})")
        url = url.strip()
        deadline = min(deadline or float("inf"), time.monotonic() + self.timeout_s)
        key = self.cache_key(url, task_id)
        hit = self._cached_bytes(key)
        if hit is not None:
            return hit
        try:
            if url.startswith("data:"):
                data = self._decode_data_uri(url)
            else:
                local = self._local(url)
                data = local if local is not None else self._download(url, task_id, hostname, fallback_token,
                                                                      deadline)
        except FetchRefused as exc:
            raise ImageError(f"refused image source: {exc}") from None
        if len(data) > self.max_bytes:
            raise ImageError(f"image {url[:120]} has {len(data)} bytes, more than MASKINV_MAX_IMAGE_MB allows")
        self._remember(key, data)
        return data

    # -- sources --------------------------------------------------------------------------------------
    @staticmethod
    def _classify(url: str) -> str:
        """"http", "cloud" or "ls" (a Label Studio path); raises FetchRefused for anything else."""
        if url.startswith(CLOUD_PREFIXES):
            return "cloud"
        scheme = urlsplit(url).scheme.lower() if ":" in url.split("/", 1)[0] else ""
        if scheme in ("http", "https"):
            return "http"
        if scheme:
            raise FetchRefused(f"URL scheme {scheme}: is not allowed for images (only http, https, data:, "
                               f"s3/gs/azure-blob through Label Studio, and Label Studio paths): {url[:200]!r}")
        if not url.startswith(LS_PATH_PREFIXES):
            raise FetchRefused(f"unsupported image URL {url[:200]!r}: not http(s), data: or a Label Studio path "
                               "(/data/upload/..., /data/local-files/?d=..., /storage-data/...)")
        if has_traversal(url):
            raise FetchRefused(f"image path {url[:200]!r} contains '..': path traversal is refused")
        return "ls"

    def _local(self, url: str) -> bytes | None:
        """Bytes of a Label Studio path found under a configured local root, else None."""
        if self._classify(url) != "ls":
            return None
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        root, rel, what = None, None, ""
        if parts.path.lstrip("/").startswith("data/local-files") and "d" in query:
            root, rel, what = self.local_files_root, query["d"][-1], "LOCAL_FILES_DOCUMENT_ROOT"
        else:
            upload = query.get("filepath", [None])[-1] if "storage-data/uploaded" in parts.path else parts.path
            upload = unquote(upload or "").lstrip("/")
            upload = upload[len("data/"):] if upload.startswith("data/") else upload
            if upload.startswith("upload/"):
                root, rel, what = (os.path.join(self.media_root, "upload") if self.media_root else None,
                                   upload[len("upload/"):], "MASKINV_MEDIA_ROOT")
        if root is None or rel is None:
            return None
        path = safe_local_path(root, rel, what)
        if not path.is_file():
            return None
        return self._read_file(path)

    def _read_file(self, path: Path) -> bytes:
        size = path.stat().st_size
        if size > self.max_bytes:
            raise ImageError(f"image file {path.name} has {size} bytes, more than MASKINV_MAX_IMAGE_MB allows")
        with path.open("rb") as f:
            return f.read(self.max_bytes + 1)

    def _download(self, url: str, task_id: int | None, hostname: str | None, fallback_token: str | None,
                  deadline: float) -> bytes:
        from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_base64_content, http_session

        kind = self._classify(url)
        setup_host = hostname.rstrip("/") if hostname and not self.label_studio_url else None
        host = self.label_studio_url or setup_host
        if kind == "http":
            self.policy.check_url(url, setup_host)  # a clear refusal before the SDK is involved
        elif not host:
            raise ImageError(f"cannot fetch image {url[:200]}: it is a Label Studio path and LABEL_STUDIO_URL is "
                             "not set (nor did Label Studio call /setup yet)")
        # the API key goes to LABEL_STUDIO_URL only; a /setup hostname gets only the /setup token
        if self.label_studio_url:
            token = self.auth.token() if self.auth.kind != "none" else None
        else:
            token = fallback_token or None
        if kind != "http" and not token:
            why = ("LABEL_STUDIO_API_KEY is only sent to LABEL_STUDIO_URL, which is not set" if self.auth.kind != "none"
                   else "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
            raise ImageError(f"cannot fetch image {url[:200]} from Label Studio at {host}: no token ({why})")
        auth_origin = Origin.of(host) if host and token else None
        ctx = _FetchContext(auth_origin, authorization_header(token) if token else None, setup_host, deadline)
        try:
            with self._context(ctx), http_session(self.session), _no_sdk_disk_reads():
                b64 = get_base64_content(url, hostname=host, access_token=token or "", task_id=task_id)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            hint = " (check LABEL_STUDIO_API_KEY)" if status in (401, 403) else ""
            raise ImageError(f"cannot fetch image {url[:200]}: HTTP {status}{hint}",
                             upstream=True) from None
        except requests.RequestException as exc:
            raise ImageError(f"cannot fetch image {url[:200]}: {exc.__class__.__name__}: {exc}",
                             upstream=True) from None
        except (ImageError, FetchRefused):
            raise
        except Exception as exc:  # noqa: BLE001 - the SDK raises FileNotFoundError/ValueError/Exception
            raise ImageError(f"cannot fetch image {url[:200]}: {exc}") from None
        return base64.b64decode(b64)

    @staticmethod
    @contextmanager
    def _context(ctx: _FetchContext) -> Iterator[None]:
        token = _context.set(ctx)
        try:
            yield
        finally:
            _context.reset(token)

    @staticmethod
    def cache_key(url: str, task_id: int | None = None) -> str:
        """Key of an image in the LRU: a ``data:`` URI by its SHA-256 (the URI itself is as large as the image),
        cloud-storage URLs per task (their presigned form differs per task), other URLs as they are."""
        if url.startswith("data:"):
            return "data:sha256:" + hashlib.sha256(url.encode()).hexdigest()
        return f"{task_id}|{url}" if url.startswith(CLOUD_PREFIXES) else url

    @staticmethod
    def _decode_data_uri(url: str) -> bytes:
        head, _, body = url.partition(",")
        if ";base64" not in head:
            raise ImageError("only base64 data: URIs are supported for images")
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the image data: URI is not valid base64") from None

    def _cached_bytes(self, key: str) -> bytes | None:
        """The cached bytes of ``key`` if stored less than MASKINV_IMAGE_CACHE_TTL seconds ago (an expired entry
        is dropped, so a file replaced at the same URL is fetched again)."""
        return self._cache.get(key)

    def _remember(self, key: str, data: bytes) -> None:
        """Keep ``data`` under ``key``; keys and bytes both count against MASKINV_IMAGE_CACHE_MB."""
        self._cache.put(key, data)


@contextmanager
def _no_sdk_disk_reads() -> Iterator[None]:
    """Keep the SDK from reading Local Storage files itself (it would follow symlinks out of its root and
    read without a size cap): local files are read by :meth:`ImageFetcher._local`. The SDK treats a resolver
    answer of ``None`` as "denied" and one that is not an existing path as "ask Label Studio"."""
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import local_files_resolver

    with local_files_resolver(lambda _relative: ""):
        yield


def image_size(data: bytes) -> tuple[int, int]:
    """``(W, H)`` of encoded image bytes as displayed (EXIF orientation applied); raises ImageError."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused: {exc} (see MASKINV_MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"the image cannot be decoded: {exc}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
