"""Open-vocabulary labels: prompt-ensembled text prototypes and region scores.

Prototypes are cached per (model, labels, templates) in an LRU bounded by entries and bytes
(``MASKINV_PROTOTYPE_CACHE_ENTRIES`` / ``MASKINV_PROTOTYPE_CACHE_MB``, from ``worker.settings``); the
tokenizer's own memo of BPE words (open_clip keeps every word it ever saw) is bounded too
(:data:`TOKENIZER_CACHE_ENTRIES`, :data:`TOKENIZER_CACHE_CHARS`). Prompts are built with
:func:`worker.protocol.fill_template`, never ``str.format`` on request text.

Text is encoded in batches with the padding cut off: prompts are ~10 tokens of CLIP's 77, and with a causal text
transformer pooled at the end-of-text token the positions after the longest prompt of a batch change nothing, so
they are not computed (same embeddings up to float rounding; models without a causal mask and argmax/eos pooling
use open_clip's ``encode_text`` unchanged).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from worker.engine.bounded_cache import BoundedCache
from worker.text.token_memo import BoundedMemo
from worker.engine.models import ClipModel
from worker.protocol import DEFAULT_TEMPLATES, PayloadError, check_template, check_templates, fill_template
from worker.settings import DEFAULT_PROTOTYPE_CACHE_ENTRIES, DEFAULT_PROTOTYPE_CACHE_MB

log = logging.getLogger(__name__)

#: bounds of the tokenizer's BPE memo (words seen; characters of words + their BPE strings)
TOKENIZER_CACHE_ENTRIES = 50_000
TOKENIZER_CACHE_CHARS = 4 << 20


def _key_bytes(key: Any) -> int:
    """Approximate bytes of a (model id, labels, templates) key."""
    if isinstance(key, str):
        return len(key.encode("utf-8", "surrogatepass")) + 50
    if isinstance(key, tuple):
        return 56 + 8 * len(key) + sum(_key_bytes(k) for k in key)
    return 64


def _prototype_bytes(key: Any, value: torch.Tensor) -> int:
    return value.element_size() * value.nelement() + _key_bytes(key)


def bound_tokenizer_cache(tokenizer: Any, max_entries: int = TOKENIZER_CACHE_ENTRIES,
                          max_chars: int = TOKENIZER_CACHE_CHARS) -> None:
    """Replace an open_clip ``SimpleTokenizer``'s unbounded ``cache`` dict by a :class:`BoundedMemo` (the entries
    it starts with, its special tokens, are kept). Tokenizers without such a dict are left alone."""
    cache = getattr(tokenizer, "cache", None)
    if isinstance(cache, dict) and not isinstance(cache, BoundedMemo):
        tokenizer.cache = BoundedMemo(cache.items(), max_entries=max_entries, max_chars=max_chars)


def _can_trim(model: Any) -> bool:
    """Whether ``model``'s text tower is open_clip's causal one, pooled at the end-of-text token."""
    if not all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final",
                                            "text_projection")):
        return False
    mask = getattr(model, "attn_mask", None)
    if getattr(model, "text_pool_type", None) not in ("argmax", "eos") or not isinstance(mask, torch.Tensor):
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return mask.dim() == 2 and bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` for ``tokens [B, C]`` over the first L positions only (L: the longest prompt),
    for a causal text tower pooled at the end-of-text token; unnormalised ``[B, D]``."""
    from open_clip.transformer import text_global_pool

    used = (tokens != 0).any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    text = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


class LabelScorer:
    """Scores region embeddings against label names, caching prototypes per (model, labels, templates)."""

    def __init__(self, clip: ClipModel, batch: int = 256, max_entries: int = DEFAULT_PROTOTYPE_CACHE_ENTRIES,
                 max_bytes: int = DEFAULT_PROTOTYPE_CACHE_MB << 20):
        self.clip = clip
        self.batch = batch
        self.cache: BoundedCache[torch.Tensor] = BoundedCache(max_entries, max_bytes, _prototype_bytes)
        bound_tokenizer_cache(clip.tokenizer)
        self._trim = _can_trim(clip.model)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings ``[T, D]``."""
        out = []
        for i in range(0, len(texts), self.batch):
            tokens = self.clip.tokenizer(list(texts[i:i + self.batch])).to(self.clip.device)
            emb = encode_text_trimmed(self.clip.model, tokens) if self._trim else self.clip.model.encode_text(tokens)
            out.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.clip.embed_dim, device=self.clip.device)

    def prototypes(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """Normalised prototypes ``[L, D]``: the mean of each label's normalised template embeddings."""
        labels, templates = tuple(labels), tuple(templates)
        if not labels:
            raise ValueError("no labels to score against")
        if not templates:
            raise ValueError("templates must be a non-empty list of strings containing '{}'")
        for t in templates:
            try:
                check_template(t)
            except PayloadError as exc:  # a ValueError naming the template
                raise PayloadError(f"templates: {exc}") from None
        key = (self.clip.id, labels, templates)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        emb = self.encode_texts([fill_template(t, label) for label in labels for t in templates])
        protos = F.normalize(emb.view(len(labels), len(templates), -1).mean(dim=1), dim=-1)
        self.cache.put(key, protos)
        return protos

    def prepare(self, label_sets: Iterable[Sequence[str]], templates: Sequence[str] = DEFAULT_TEMPLATES) -> int:
        """Build and cache the prototypes of every label set not cached yet, encoding all their prompts in one
        batched pass; returns how many prompts were encoded."""
        templates = tuple(templates)
        try:
            check_templates(templates)
        except PayloadError as exc:  # a ValueError naming the template
            raise PayloadError(f"templates: {exc}") from None
        todo: dict[tuple, tuple[str, ...]] = {}
        for labels in label_sets:
            key = (self.clip.id, tuple(labels), templates)
            if key[1] and key not in self.cache:
                todo[key] = key[1]
        texts = [fill_template(t, label) for labels in todo.values() for label in labels for t in templates]
        if not texts:
            return 0
        emb = self.encode_texts(texts)
        start = 0
        for key, labels in todo.items():
            n = len(labels) * len(templates)
            protos = F.normalize(emb[start:start + n].view(len(labels), len(templates), -1).mean(dim=1), dim=-1)
            start += n
            self.cache.put(key, protos)
        return len(texts)

    @torch.no_grad()
    def probabilities(self, embeddings: torch.Tensor, labels: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """Softmax over labels of ``logit_scale * cos`` ``[N, L]`` for embeddings ``[N, D]``."""
        protos = self.prototypes(labels, templates)
        cos = F.normalize(embeddings.float(), dim=-1) @ protos.T
        return torch.softmax(self.clip.model.logit_scale.exp().float() * cos, dim=-1)

    def score(self, embeddings: torch.Tensor, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
              top_k: int = 3) -> list[list[tuple[str, float]]]:
        """Top-k ``(label, probability)`` per embedding, best first."""
        probs = self.probabilities(embeddings, labels, templates)
        k = min(top_k, len(labels))
        vals, idx = probs.topk(k, dim=-1)
        return [[(labels[j], float(v)) for v, j in zip(vr.tolist(), ir.tolist())] for vr, ir in zip(vals, idx)]
