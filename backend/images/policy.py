"""Which image sources the backend may read: the SSRF and path-traversal policy.

A task's image URL comes from whoever can create tasks (or reach ``/predict``), so the backend only reads

* the Label Studio host it was configured with (``LABEL_STUDIO_URL``; the hostname Label Studio sent to
  ``/setup`` when that is unset), for its relative URLs (``/data/upload/...``, ``/data/local-files/...``,
  cloud URIs through ``/tasks/<id>/presign/``);
* files under the configured local roots (``LOCAL_FILES_DOCUMENT_ROOT``, ``MASKINV_MEDIA_ROOT``): a path with a
  ``..`` component, or one that resolves (symlinks included) outside its root, is refused;
* ``http(s)`` URLs whose host is on ``MASKINV_ALLOWED_HOSTS``.

Every TCP connection is checked again when it is opened (so DNS rebinding and redirects cannot get around
the host check): an address must be public unless the host is trusted (``LABEL_STUDIO_URL``'s host or an
exact host entry of the allow-list) or the address lies in an IP/CIDR entry of the allow-list. Private,
loopback, link-local, multicast and reserved addresses are refused otherwise.

Allow-list syntax (comma-separated): ``images.example.com`` (that host, any address), ``*.example.com``
(its subdomains, public addresses only), ``127.0.0.1``, ``::1``, ``10.0.0.0/8`` (IP literals and networks;
they also admit those addresses for any allowed host); any entry but a network may end in ``:port`` to allow
only that port (IPv6 with a port: ``[::1]:8080``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

from backend.images.urls import DEFAULT_PORTS, ParsedURL, UnsafeURL, parse_http_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network



class FetchRefused(ValueError):
    """The policy forbids reading this source; the message says which rule and how to allow it."""


@dataclass(frozen=True)
class HostEntry:
    """One allow-list entry."""

    text: str
    name: str | None = None  # exact host name (lower case, no trailing dot)
    suffix: str | None = None  # "*.example.com" -> ".example.com"
    network: IPNetwork | None = None  # IP literal (a /32 or /128) or CIDR network
    port: int | None = None

    @property
    def exact(self) -> bool:
        """An exact host (name or single IP): trusted to resolve to private addresses."""
        return self.name is not None or (self.network is not None and self.network.num_addresses == 1)

    def matches_host(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.name is not None:
            return host == self.name
        if self.suffix is not None:
            return host.endswith(self.suffix) and len(host) > len(self.suffix)
        ip = parse_ip(host)
        return ip is not None and self.network is not None and ip in self.network

    def covers_address(self, ip: IPAddress, port: int) -> bool:
        return (self.network is not None and (self.port is None or port == self.port)
                and ip.version == self.network.version and ip in self.network)


def normalise_host(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


def parse_ip(text: str) -> IPAddress | None:
    """The IP address in ``text`` (IPv4-mapped IPv6 addresses are unwrapped), or None for a name."""
    try:
        ip = ipaddress.ip_address(normalise_host(text).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_entry(text: str) -> HostEntry:
    """Parse one allow-list entry; raises ValueError with the reason."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty entry")
    if "/" in raw:
        try:
            return HostEntry(raw, network=ipaddress.ip_network(raw.strip("[]"), strict=False))
        except ValueError:
            raise ValueError(f"{raw!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    host, port = raw, None
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ValueError(f"{raw!r}: missing ']'")
        host, rest = raw[1:end], raw[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{raw!r}: expected ':port' after ']'")
            port = _port(rest[1:], raw)
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
        port = _port(port_text, raw)
    ip = parse_ip(host)
    if ip is not None:
        return HostEntry(raw, network=ipaddress.ip_network(ip), port=port)
    host = normalise_host(host)
    if host.startswith("*."):
        if not _valid_name(host[2:]):
            raise ValueError(f"{raw!r} is not a valid wildcard host (e.g. *.example.com)")
        return HostEntry(raw, suffix=host[1:], port=port)
    if not _valid_name(host):
        raise ValueError(f"{raw!r} is not a host name, IP address or network")
    return HostEntry(raw, name=host, port=port)


def _port(text: str, raw: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{raw!r}: bad port {text!r}")
    return int(text)


def _valid_name(host: str) -> bool:
    labels = host.split(".")
    return bool(host) and len(host) <= 253 and all(
        0 < len(lab) <= 63 and all(c.isalnum() or c in "-_" for c in lab) for lab in labels)


def parse_allow_list(text: str | None) -> tuple[HostEntry, ...]:
    """Entries of a comma-separated allow-list (see module docstring); raises ValueError naming a bad one."""
    return tuple(parse_entry(t) for t in (text or "").split(",") if t.strip())


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast address (not private, loopback, link-local, multicast, reserved, ...)."""
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> "Origin":
        """Origin of an absolute http(s) URL, parsed strictly (:func:`backend.images.urls.parse_http_url`: a URL
        that two parsers could read differently is refused); raises FetchRefused for anything else."""
        scheme = url.split(":", 1)[0].lower() if isinstance(url, str) and ":" in url else ""
        if isinstance(url, str) and scheme not in DEFAULT_PORTS:
            raise FetchRefused(f"URL scheme {scheme + ':' if scheme else '(none)'} is not allowed for images "
                               f"(only http, https, data: and Label Studio paths): {url[:200]!r}")
        try:
            parsed = parse_http_url(url)
        except UnsafeURL as exc:
            raise FetchRefused(f"malformed or ambiguous URL: {exc}") from None
        return cls.of_parsed(parsed)

    @classmethod
    def of_parsed(cls, parsed: ParsedURL) -> "Origin":
        return cls(parsed.scheme, normalise_host(parsed.host), parsed.port)


def sends_credential(origin: Origin, credential_origin: Origin | None) -> bool:
    """True only when ``origin`` (scheme, host, port) is exactly the origin the credential belongs to."""
    return credential_origin is not None and origin == credential_origin


@dataclass(frozen=True)
class Route:
    """Decision for one request: the origin connected to, the URL and whether it carries the credential."""

    origin: Origin
    url: str
    credential: bool


class FetchPolicy:
    """Decides which URLs, addresses and local files the backend may read."""

    def __init__(self, label_studio_url: str | None = None, allowed: Iterable[HostEntry] = (),
                 resolver=socket.getaddrinfo):
        self.label_studio = Origin.of(label_studio_url) if label_studio_url else None
        self.allowed = tuple(allowed)
        self._getaddrinfo = resolver

    # -- hosts --------------------------------------------------------------------------------------
    def check_url(self, url: str, setup_host: str | None = None) -> Origin:
        """Origin of ``url`` if its host may be contacted at all (addresses are checked on connect).

        ``setup_host``: the Label Studio URL received by ``/setup`` (used when LABEL_STUDIO_URL is unset);
        its host is allowed, but only at public or allow-listed addresses.
        """
        origin = Origin.of(url)
        if self.label_studio is not None and origin == self.label_studio:
            return origin
        if setup_host and self.label_studio is None:
            try:
                if Origin.of(setup_host) == origin:
                    return origin
            except FetchRefused:
                pass
        if any(e.matches_host(origin.host, origin.port) for e in self.allowed):
            return origin
        where = f"{origin.host}:{origin.port}" if origin.port != DEFAULT_PORTS[origin.scheme] else origin.host
        raise FetchRefused(f"image host {where} is not allowed: only the Label Studio host "
                           f"({self._ls_text()}) and hosts on MASKINV_ALLOWED_HOSTS are fetched")

    def route(self, url: str, setup_host: str | None = None, credential_origin: Origin | None = None) -> "Route":
        """Where ``url`` goes and whether it carries the Label Studio credential — the one decision for every
        request and redirect hop. ``url`` is parsed once, strictly (ambiguous URLs are refused), and the
        credential goes only to ``credential_origin`` (the Label Studio origin the token belongs to)."""
        origin = self.check_url(url, setup_host)
        credential = sends_credential(origin, credential_origin)
        if credential and has_traversal(url):
            raise FetchRefused(f"URL {url[:200]!r} contains '..': path traversal is refused (it would be sent to "
                               "Label Studio with its credential)")
        return Route(origin, url, credential)

    def _ls_text(self) -> str:
        if self.label_studio is None:
            return "LABEL_STUDIO_URL unset"
        return f"{self.label_studio.host}:{self.label_studio.port}"

    def trusted_host(self, host: str, port: int) -> bool:
        """May this host's name resolve to non-public addresses?"""
        host = normalise_host(host)
        if self.label_studio is not None and (host, port) == (self.label_studio.host, self.label_studio.port):
            return True
        return any(e.exact and e.matches_host(host, port) for e in self.allowed)

    # -- addresses ----------------------------------------------------------------------------------
    def address_allowed(self, ip: IPAddress, host: str, port: int) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return (is_public(ip) or self.trusted_host(host, port)
                or any(e.covers_address(ip, port) for e in self.allowed))

    def resolve(self, host: str, port: int) -> list[tuple[int, str]]:
        """``[(family, ip)]`` this host may be connected to; raises FetchRefused when none is allowed.

        Raises ``socket.gaierror`` when the name does not resolve.
        """
        infos = self._getaddrinfo(normalise_host(host), port, type=socket.SOCK_STREAM)
        allowed, refused = [], []
        for family, _, _, _, sockaddr in infos:
            ip = parse_ip(str(sockaddr[0]))
            if ip is None:
                continue
            if self.address_allowed(ip, host, port):
                if (family, str(sockaddr[0])) not in allowed:
                    allowed.append((family, str(sockaddr[0])))
            else:
                refused.append(str(ip))
        if not allowed:
            kind = _kind(parse_ip(refused[0])) if refused else "no"
            raise FetchRefused(
                f"refusing to connect to {host}:{port}: it resolves to {kind} address(es) "
                f"{', '.join(dict.fromkeys(refused)) or '(none)'}; add the host or its network to "
                "MASKINV_ALLOWED_HOSTS if it is a trusted image source")
        return allowed


def _kind(ip: IPAddress | None) -> str:
    if ip is None:
        return "unusable"
    for attr in ("is_loopback", "is_link_local", "is_private", "is_multicast", "is_reserved", "is_unspecified"):
        if getattr(ip, attr):
            return attr[3:].replace("_", "-")
    return "non-public"


def has_traversal(url: str) -> bool:
    """Does a Label Studio path have a ``..`` segment in its path or in any query value (``d=``, ``filepath=``, ...),
    also percent-encoded (once or several times) or with backslashes? Checked whether or not a local root is set:
    the path is otherwise forwarded to Label Studio, with the credential."""
    parts = urlsplit(url)
    texts = [parts.path] + [v for _, v in parse_qsl(parts.query, keep_blank_values=True)] + [parts.query]
    for text in texts:
        for _ in range(4):  # %252e%252e -> %2e%2e -> ..
            decoded = unquote(text)
            if decoded == text:
                break
            text = decoded
        if any(seg.strip() == ".." for seg in text.replace("\\", "/").replace("&", "/").replace("=", "/").split("/")):
            return True
    return False


def safe_local_path(root: str | os.PathLike, relative: str, what: str) -> Path:
    """``root/relative`` (a leading ``/`` is ignored, as Label Studio does) after refusing ``..`` components and
    symlinks that lead out of the root. The file need not exist. Raises FetchRefused with the reason.
    """
    rel = relative.replace("\\", "/")
    if "\0" in rel:
        raise FetchRefused(f"{what} path contains a NUL byte")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise FetchRefused(f"{what} path {relative[:200]!r} contains '..': path traversal is refused")
    if not parts:
        raise FetchRefused(f"{what} path is empty")
    base = Path(root).resolve()
    target = base.joinpath(*parts)
    real = target.resolve()  # follows symlinks (also of missing files' existing parents)
    if real != base and base not in real.parents:
        raise FetchRefused(f"{what} path {relative[:200]!r} leaves its root (symlink to {real}): refused")
    return real
