"""Prompt templates and label names: validation, caps and prompt building (torch-free; backend and worker).

User text is never a format string. A template must contain exactly one bare ``{}`` field (no name, index,
attribute, conversion or format spec: ``{0}``, ``{x}``, ``{!r}``, ``{:>9999}`` are refused) and may contain
literal braces as ``{{`` / ``}}``; it is checked with :class:`string.Formatter` ``parse`` and filled by
:func:`fill_template`, which puts the label where the ``{}`` was without calling ``str.format``.

Caps (every text a request can lengthen has one; defaults below, env vars read by the backend's settings and
by the worker where its runtime is built):

* ``MASKINV_MAX_LABEL_CHARS`` — characters of one label (config ``<Label value>``, ``MASKINV_LABELS`` and
  ``params.maskinv.labels``); CLIP reads 77 tokens, and tokenising one long word costs super-linear time;
* ``MASKINV_MAX_VOCAB_BYTES`` — UTF-8 bytes of one vocabulary (all labels of a control or of the override);
* ``MASKINV_MAX_TEMPLATE_CHARS`` — characters of one template.
"""

from __future__ import annotations

from string import Formatter
from typing import Any, Iterable

from worker.protocol.errors import PayloadError


DEFAULT_MAX_LABEL_CHARS = 200
DEFAULT_MAX_VOCAB_BYTES = 64 * 1024
DEFAULT_MAX_TEMPLATE_CHARS = 300
#: hard ceiling on a template's length, whatever the settings (InversionParams.validate)
TEMPLATE_CHARS_CEILING = 1000
#: most labels an ``embed_regions`` job computes text prototypes for, and most rows of example prototypes
MAX_EMBED_LABELS = 1000


def check_labels(labels: Any) -> list[str]:
    """``labels`` as a list of unique non-empty strings (empty allowed); PayloadError otherwise."""
    labels = labels or []
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise PayloadError("labels must be a list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise PayloadError("labels must be unique")
    return labels


def _show(text: str, n: int = 40) -> str:
    """``text`` quoted and truncated for an error message."""
    return repr(text[:n] + "...") if len(text) > n else repr(text)


def check_template(template: object, max_chars: int = TEMPLATE_CHARS_CEILING) -> str:
    """Return ``template`` if it is a string with exactly one bare ``{}`` field; raises PayloadError naming it."""
    if not isinstance(template, str):
        raise PayloadError(f"template must be a string, got {type(template).__name__}")
    if len(template) > max_chars:
        raise PayloadError(f"template {_show(template)} has {len(template)} characters, more than "
                           f"{max_chars} (MASKINV_MAX_TEMPLATE_CHARS); templates must be at most {max_chars} "
                           "characters")
    try:
        parts = list(Formatter().parse(template))
    except ValueError as exc:
        raise PayloadError(f"template {_show(template)} is malformed ({exc}); write literal braces as '{{{{' and "
                           "'}}'") from None
    fields = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
    if len(fields) != 1:
        raise PayloadError(f"template {_show(template)} must contain exactly one '{{}}' field, got {len(fields)}")
    name, spec, conv = fields[0]
    if name != "" or spec or conv is not None:
        raise PayloadError(f"template {_show(template)}: its field must be a bare '{{}}' (no name, index, "
                           "attribute, '!' conversion or ':' format spec)")
    return template


def fill_template(template: str, label: str) -> str:
    """``template`` with its one ``{}`` replaced by ``label`` (``{{``/``}}`` become ``{``/``}``); validates first."""
    check_template(template)
    return "".join(literal + (label if name is not None else "")
                   for literal, name, _, _ in Formatter().parse(template))


def check_templates(templates: Iterable[object], max_chars: int = TEMPLATE_CHARS_CEILING) -> tuple[str, ...]:
    out = tuple(check_template(t, max_chars) for t in templates)
    if not out:
        raise PayloadError("templates must be a non-empty list")
    return out


def check_label_caps(labels: Iterable[str], max_chars: int = DEFAULT_MAX_LABEL_CHARS,
                 max_vocab_bytes: int = DEFAULT_MAX_VOCAB_BYTES, what: str = "label") -> None:
    """Raise PayloadError naming the first label over ``max_chars`` characters, or the vocabulary when all its
    labels together have more than ``max_vocab_bytes`` UTF-8 bytes."""
    total = 0
    labels = list(labels)
    for label in labels:
        if len(label) > max_chars:
            raise PayloadError(f"{what} {_show(label)} has {len(label)} characters, more than "
                               f"MASKINV_MAX_LABEL_CHARS={max_chars}; labels must be at most {max_chars} characters")
        total += len(label.encode("utf-8", "surrogatepass"))
    if total > max_vocab_bytes:
        raise PayloadError(f"the vocabulary ({len(labels)} labels, starting {_show(labels[0], 20)}) has {total} "
                           f"bytes, more than MASKINV_MAX_VOCAB_BYTES={max_vocab_bytes}")
