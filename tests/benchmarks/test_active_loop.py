"""benchmarks.active_loop: the loop's bookkeeping and orders on synthetic regions (no model)."""

from __future__ import annotations

import numpy as np

from benchmarks.active_loop import ORDERS, labels_to_reach, run_loop, summarise, verified_on_test
from worker.protocol.features import learning_features


def _world(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, n)
    centres = np.eye(4, 8)
    x = centres[label] + 0.6 * rng.normal(size=(n, 8))
    crops = centres[label] + 0.3 * rng.normal(size=(n, 8))
    return {"x1": x, "x2": x, "f2": learning_features(x, crops), "label": label, "scene": np.arange(n) // 2}


def test_each_order_labels_one_batch_per_round_and_learns():
    pool, test = _world(200, 0), _world(100, 1)
    text = np.eye(4, 8)[[1, 2, 3, 0]]  # the text names every label wrongly: only examples help
    for order in ORDERS:
        curve, proj = run_loop(pool, test, text, 10.0, order, 0, rounds=3, batch=10)
        assert [n for n, _ in curve] == [0, 10, 20, 30] and len(proj.y) == 30
        assert curve[-1][1] > curve[0][1]


def test_verified_counts_and_summary_follow_the_schema():
    pool, test = _world(300, 2), _world(100, 3)
    curves: dict[str, list] = {o: [] for o in ORDERS}
    for order in ORDERS:
        curve, proj = run_loop(pool, test, np.eye(4, 8), 10.0, order, 0, rounds=4, batch=25)
        curves[order].append(curve)
    v = verified_on_test(proj, test)
    assert 0.0 <= v["coverage"] <= 100.0 and v["labels"] == 100 and "_reliability" in v
    v.pop("_reliability")
    out = summarise(curves, [v], 100)
    assert set(out) >= {"test_regions", "target_precision", "verified", "loop", "labels_to_reach"}
    assert set(out["verified"]) == {"coverage", "precision", "labels"}
    assert set(out["loop"]) == set(ORDERS) and out["loop"]["random"][0][0] == 0
    assert set(out["labels_to_reach"]) >= {"target_acc1", "random", "product"}


def test_labels_to_reach_is_the_first_count_at_or_above_the_target():
    curve = [[0, 40.0], [25, 50.0], [50, 49.0], [75, 56.0]]
    assert labels_to_reach(curve, 50.0) == 25 and labels_to_reach(curve, 55.0) == 75
    assert labels_to_reach(curve, 60.0) is None
