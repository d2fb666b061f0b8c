"""Open-vocabulary labels: prompt-ensembled text prototypes and region scores."""

from __future__ import annotations

import threading
from typing import Sequence

import torch
import torch.nn.functional as F

from .models import ClipModel
from .payload import DEFAULT_TEMPLATES


class LabelScorer:
    """Scores region embeddings against label names, caching prototypes per (model, labels, templates)."""

    def __init__(self, clip: ClipModel, batch: int = 256):
        self.clip = clip
        self.batch = batch
        self._cache: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings ``[T, D]``."""
        out = []
        for i in range(0, len(texts), self.batch):
            tokens = self.clip.tokenizer(list(texts[i:i + self.batch])).to(self.clip.device)
            out.append(F.normalize(self.clip.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.clip.embed_dim, device=self.clip.device)

    def prototypes(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """Normalised prototypes ``[L, D]``: the mean of each label's normalised template embeddings."""
        labels, templates = tuple(labels), tuple(templates)
        if not labels:
            raise ValueError("no labels to score against")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("templates must be a non-empty list of strings containing '{}'")
        key = (self.clip.id, labels, templates)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        emb = self.encode_texts([t.format(label) for label in labels for t in templates])
        protos = F.normalize(emb.view(len(labels), len(templates), -1).mean(dim=1), dim=-1)
        with self._lock:
            self._cache[key] = protos
        return protos

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
