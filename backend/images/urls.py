"""Absolute http(s) URLs that every parser on the fetch path reads the same way (else: refused).

The decision "may this URL be fetched, and does it get the Label Studio credential?" and the connection
itself must see the same scheme, host and port. Python's ``urllib.parse``, urllib3 (which opens requests'
connections) and browsers (WHATWG) disagree about several spellings:

* ``\\`` — urllib3 and WHATWG end the authority at a backslash, ``urllib.parse`` does not:
  ``http://a:1\\@b:2/`` is ``b:2`` to one and ``a:1`` to the other;
* userinfo ``user@host`` — where the authority ends decides which ``@`` counts;
* control characters and whitespace — ``urllib.parse`` silently deletes tab/CR/LF, urllib3 refuses them;
* percent-encoding or non-ASCII in the host — decoded (IDNA) by some parsers, not by others.

:func:`parse_http_url` refuses all of these, then parses the URL with this module's own grammar and checks
that ``urllib.parse`` and urllib3 agree with it on scheme, host and port; any disagreement is refused too.
The result is what :class:`backend.images.policy.FetchPolicy` decides on and what the connection is compared
with (``backend.images.fetch``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+$")
#: percent-encoded control characters and backslash (refused before the query): no image path needs them, and a
#: decoder down the line would turn them into what the raw form is refused for
_ENCODED_UNSAFE = re.compile(r"%(?:[01][0-9A-Fa-f]|7[Ff]|5[Cc])")


class UnsafeURL(ValueError):
    """A URL that two parsers could read differently, or that is not an absolute http(s) URL."""


@dataclass(frozen=True)
class ParsedURL:
    """Scheme (lower case), host (lower case, no brackets, no trailing dot) and port (explicit or default)."""

    scheme: str
    host: str
    port: int
    url: str


def _show(url: str) -> str:
    return repr(url[:200])


def parse_http_url(url: str) -> ParsedURL:
    """Parse an absolute ``http``/``https`` URL strictly; raises :class:`UnsafeURL` with the reason."""
    if not isinstance(url, str):
        raise UnsafeURL(f"URL must be a string, got {type(url).__name__}")
    bad = next((c for c in url if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise UnsafeURL(f"URL contains a control character ({bad!r}): {_show(url)}")
    if "\\" in url:
        raise UnsafeURL(f"URL contains a backslash (parsers disagree where its host ends): {_show(url)}")
    if _ENCODED_UNSAFE.search(re.split(r"[?#]", url, maxsplit=1)[0]):
        raise UnsafeURL(f"URL host or path contains a percent-encoded control character or backslash: {_show(url)}")
    m = _SCHEME.match(url)
    if m is None:
        raise UnsafeURL(f"not an absolute http(s) URL: {_show(url)}")
    scheme = m.group(1).lower()
    if scheme not in DEFAULT_PORTS:
        raise UnsafeURL(f"URL scheme {scheme}: is not allowed (only http and https): {_show(url)}")
    rest = url[m.end():]
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    authority = rest[:end]
    if "@" in authority:
        raise UnsafeURL(f"URL has user info ('@' before the host), refused: {_show(url)}")
    if any(c.isspace() or ord(c) > 0x7E for c in authority):
        raise UnsafeURL(f"URL host contains whitespace or non-ASCII characters: {_show(url)}")
    if "%" in authority:
        raise UnsafeURL(f"URL host is percent-encoded, refused: {_show(url)}")
    host, port_text = _split_authority(authority, url)
    port = DEFAULT_PORTS[scheme]
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UnsafeURL(f"URL has a bad port {port_text!r}: {_show(url)}")
        port = int(port_text)
    parsed = ParsedURL(scheme, host.lower().rstrip("."), port, url)
    if not parsed.host:
        raise UnsafeURL(f"URL has no host: {_show(url)}")
    _check_agreement(parsed)
    return parsed


def _split_authority(authority: str, url: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        close = authority.find("]")
        host, tail = authority[1:close], authority[close + 1:]
        if close < 0 or not _IPV6.match(host) or (tail and not tail.startswith(":")):
            raise UnsafeURL(f"URL has a malformed IPv6 host: {_show(url)}")
        return host, tail[1:] if tail else None
    host, sep, port = authority.partition(":")
    if ":" in port:
        raise UnsafeURL(f"URL host has more than one ':' (IPv6 needs [...]): {_show(url)}")
    if host and not _HOST_NAME.match(host):
        raise UnsafeURL(f"URL host {host[:100]!r} has characters not allowed in a host name: {_show(url)}")
    return host, port if sep else None


def _check_agreement(parsed: ParsedURL) -> None:
    """``urllib.parse`` and urllib3 must read the same scheme, host and port as :func:`parse_http_url`."""
    from urllib3.util import parse_url

    url = parsed.url
    try:
        a = urlsplit(url)
        readings = [(a.scheme.lower(), (a.hostname or "").lower().rstrip("."),
                     a.port or DEFAULT_PORTS.get(a.scheme.lower()))]
        b = parse_url(url)
        readings.append(((b.scheme or "").lower(), (b.host or "").lower().strip("[]").rstrip("."),
                         b.port or DEFAULT_PORTS.get((b.scheme or "").lower())))
    except ValueError as exc:  # urllib3's LocationParseError is a ValueError
        raise UnsafeURL(f"URL cannot be parsed: {exc}: {_show(url)}") from None
    mine = (parsed.scheme, parsed.host, parsed.port)
    if any(r != mine for r in readings):
        raise UnsafeURL(f"URL parsers disagree on its host ({mine} vs {readings}): {_show(url)}")
