"""The contract's error and its version: :class:`ProtocolError` and :data:`PROTOCOL_VERSION`."""

from __future__ import annotations

from typing import Any, Mapping

#: version of the payload/result format; bump the major on an incompatible change
PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A job payload or a result does not follow the contract; the message names the field."""


#: the name the payload codec has always used for its errors (same class)
PayloadError = ProtocolError


def check_payload_version(payload: Mapping[str, Any]) -> int:
    """The protocol version of a job payload (1 when absent); ProtocolError for a newer one."""
    v = payload.get("v", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ProtocolError(f"job payload has an invalid protocol version {v!r}")
    if v > PROTOCOL_VERSION:
        raise ProtocolError(f"job payload has protocol version {v}; this worker understands up to "
                            f"{PROTOCOL_VERSION} (upgrade the worker)")
    return v
