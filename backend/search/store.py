"""The one small interface every region store implements (:class:`RegionStore`), and :func:`open_store`.

Stores: :class:`backend.search.faiss_store.FaissSqliteStore` (embedded default: one directory, no server) and
:class:`backend.search.pgvector_store.PgvectorStore` (PostgreSQL + pgvector, for deployments beyond one machine).
Both keep one model's vectors apart from every other's: a search names its model and never sees another's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from backend.search.faiss_store import FaissSqliteStore
from backend.search.pgvector_store import PgvectorStore
from backend.search.records import RegionRecord, SearchFilter, SearchHit


class RegionStore(Protocol):
    """Regions and their unit vectors ``[D]``, by model; filtered top-k by inner product."""

    def upsert(self, records: Sequence[RegionRecord], vectors: np.ndarray) -> int:
        """Index ``records`` (one model) with ``vectors [N, D]``; a record with the key of a stored one replaces
        it. Returns how many were written."""
        ...

    def delete_tasks(self, project: str, tasks: Sequence[int]) -> int:
        """Remove every region of these tasks (all models); returns how many."""
        ...

    def delete_annotations(self, project: str, annotations: Sequence[str]) -> int:
        """Remove every region of these annotations (all models); returns how many."""
        ...

    def search(self, query: np.ndarray, flt: SearchFilter, k: int) -> list[SearchHit]:
        """The ``k`` regions passing ``flt`` with the highest inner product with ``query [D]``, best first."""
        ...

    def fetch(self, flt: SearchFilter, limit: int, tasks: Sequence[int] | None = None
              ) -> tuple[list[RegionRecord], np.ndarray]:
        """Up to ``limit`` regions passing ``flt`` (and of ``tasks``, when given) and their vectors ``[N, D]``."""
        ...

    def count(self, model: str | None = None, project: str | None = None) -> int:
        """How many regions are indexed (of a model, of a project)."""
        ...

    def close(self) -> None:
        """Persist what is pending and release the store."""
        ...


def open_store(url: str, data_dir: str) -> RegionStore:
    """``url``: ``embedded`` (``<data_dir>/search``) or a ``postgresql://`` URL."""
    if url.startswith(("postgresql://", "postgres://")):
        return PgvectorStore(url)
    if url != "embedded":
        raise ValueError(f"MASKINV_SEARCH_STORE must be 'off', 'embedded' or a postgresql:// URL, got {url!r}")
    return FaissSqliteStore(Path(data_dir) / "search")
