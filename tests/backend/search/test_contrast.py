"""Text queries rank regions by the probability that the query, not another label, describes them."""

from __future__ import annotations

import numpy as np
import pytest

from backend.search.contrast import MAX_CONTRAST_LABELS, contrast_labels, query_log_probability, rank, rank_vectors
from backend.search.faiss_store import FaissSqliteStore
from backend.search.queries import parse_query, run_query
from backend.search.records import RegionRecord


def test_contrast_labels_are_the_regions_labels_most_frequent_first_without_the_query() -> None:
    labels = ["blue star", "red star, blue star", "", "Red Star", "green circle", "blue star"]
    assert contrast_labels("red star", labels) == ["blue star", "green circle"]
    assert contrast_labels("square", labels) == ["blue star", "Red Star", "green circle", "red star"]
    many = [f"label {i:03d}" for i in range(MAX_CONTRAST_LABELS + 50)]
    assert len(contrast_labels("x", many)) == MAX_CONTRAST_LABELS


def test_contrast_labels_cap_keeps_the_most_frequent() -> None:
    assert contrast_labels("q", ["b", "a", "b", "c", "c", "c"], cap=2) == ["c", "b"]


def test_the_log_probability_is_a_softmax_with_the_query_as_one_more_label() -> None:
    rng = np.random.default_rng(0)
    qc, lc, s = rng.uniform(-1, 1, 7), rng.uniform(-1, 1, (7, 4)), 36.4
    every = s * np.concatenate([qc[:, None], lc], axis=1)
    want = every[:, 0] - np.log(np.exp(every).sum(axis=1))
    assert np.allclose(query_log_probability(qc, lc, s), want)
    assert np.allclose(query_log_probability(qc, np.zeros((7, 0)), s), 0.0)


def test_a_region_close_to_every_text_ranks_below_one_that_fits_only_the_query() -> None:
    # region 0: cosine 0.5 to the query but 0.6 to another label; region 1: 0.4 to the query, 0.1 to the other
    order, prob = rank(np.array([0.5, 0.4]), np.array([[0.6], [0.1]]), 36.4)
    assert order.tolist() == [1, 0] and prob[1] > 0.99 > 0.5 > prob[0]


def test_without_contrast_labels_the_cosine_decides() -> None:
    order, prob = rank(np.array([0.1, 0.7, 0.3]), np.zeros((3, 0)), 36.4)
    assert order.tolist() == [1, 2, 0] and np.allclose(prob, 1.0)


def _unit(*rows: list[float]) -> np.ndarray:
    x = np.array(rows, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_rank_vectors_matches_rank_on_cosines() -> None:
    x, q, lab = _unit([1, 0, 0], [0.6, 0.8, 0]), _unit([1, 0, 0])[0], _unit([0, 1, 0])
    order, prob, cos = rank_vectors(x, q, lab, 10.0)
    assert np.allclose(cos, [1.0, 0.6]) and order.tolist() == [0, 1] and prob[0] > prob[1]


def test_a_text_query_ranks_by_probability_through_the_store(tmp_path) -> None:
    texts = {"red star": [1, 0, 0, 0], "blue star": [0.7, 0.7, 0, 0], "green circle": [0, 0, 1, 0]}
    regions = _unit([0.8, 0.6, 0.0, 0.0],   # a blue star that looks a bit like the query
                    [0.75, 0.0, 0.0, 0.66],  # a red star (nothing else fits it)
                    [0.0, 0.1, 1.0, 0.0])    # a green circle
    store = FaissSqliteStore(tmp_path)
    labels = ["blue star", "red star", "green circle"]
    store.upsert([RegionRecord(model="m", project="1", task=i, region=f"r{i}", label=lab, source="suggested")
                  for i, lab in enumerate(labels)], regions)
    asked: list[tuple[str, ...]] = []

    def text_embed(names):
        asked.append(tuple(names))
        return _unit(*[texts[n] for n in names]), 36.4

    hits = run_query(store, parse_query({"projects": [1], "text": "red star", "k": 3}, "m"), text_embed)
    assert [h.record.region for h in hits] == ["r1", "r0", "r2"]
    assert hits[0].similarity > 0.5 > hits[1].similarity
    assert hits[0].extra["cosine"] < hits[1].extra["cosine"]  # the cosine alone would put the blue star first
    assert asked == [("red star",), ("blue star", "green circle")]
    store.close()


def test_the_cosine_ranking_is_kept_when_no_region_has_a_label(tmp_path) -> None:
    store = FaissSqliteStore(tmp_path)
    store.upsert([RegionRecord(model="m", project="1", task=i, region=f"r{i}") for i in range(2)],
                 _unit([0.2, 1.0], [1.0, 0.1]))
    hits = run_query(store, parse_query({"projects": [1], "text": "x", "k": 2}, "m"),
                     lambda names: (_unit(*[[1.0, 0.0]] * len(names)), 10.0))
    assert [h.record.region for h in hits] == ["r1", "r0"] and hits[0].similarity == pytest.approx(1.0)
    store.close()
