"""worker.proposals.objectness: features, the logistic fit, the committed model and its fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from worker.proposals import objectness as obj


def _box(size, y0, y1, x0, x1):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_context_features_see_duplicates_nesting_and_loners():
    big = _box(16, 0, 8, 0, 8)
    twin = _box(16, 0, 8, 0, 7)  # IoU 7/8 with big
    small = _box(16, 1, 3, 1, 3)  # inside big and twin
    alone = _box(16, 12, 16, 12, 16)
    x = obj.context_features(np.stack([big, twin, small, alone]))
    assert x.shape == (4, len(obj.CONTEXT))
    max_iou, support, inside, contains = x.T
    assert max_iou[0] == pytest.approx(7 / 8) and max_iou[3] == 0.0
    assert support[0] == pytest.approx(np.log1p(1)) and support[3] == 0.0
    assert inside[2] == 1.0 and inside[0] == 0.0 and inside[3] == 0.0  # only the small one lies in a larger one
    assert contains[0] == pytest.approx(np.log1p(2)) and contains[2] == 0.0
    assert obj.context_features(np.zeros((0, 4, 4), bool)).shape == (0, len(obj.CONTEXT))


def test_shape_features_fill_border_and_area():
    full = np.ones((10, 10), bool)
    diag = np.eye(10, dtype=bool)
    inner = _box(10, 2, 6, 2, 6)
    x = obj.mask_shape_features(np.stack([full, diag, inner]))
    assert x[0, 1] == 1.0 and x[0, 2] == 1.0 and x[0, 0] == pytest.approx(0.0)
    assert x[1, 1] == pytest.approx(0.1)  # 10 pixels in a 10 x 10 box
    assert x[2, 2] == 0.0 and x[2, 0] == pytest.approx(np.log(0.16))


def test_features_have_one_column_per_name_and_one_hot_sources():
    masks = np.stack([_box(8, 0, 4, 0, 4), _box(8, 4, 8, 4, 8)])
    intr = obj.intrinsic_features(masks, np.array([0.2, 0.9]), np.array([0.5, 0.95]), np.array([0.1, 0.8]),
                                  np.array([0.7, 0.3]), np.array([1.0, 0.0]))
    x = obj.features(intr, masks, ["keyseeds", "sam"])
    assert x.shape == (2, len(obj.FEATURES))
    col = {n: x[:, i] for i, n in enumerate(obj.FEATURES)}
    assert col["gain"] == pytest.approx([0.3, 0.05])
    assert list(col["src_keyseeds"]) == [1.0, 0.0] and list(col["src_maskcut"]) == [0.0, 0.0]


def test_stability_is_one_for_a_uniform_block_and_zero_without_a_seed():
    grid, size = 4, 16
    keys = torch.zeros(grid * grid, 3)
    keys[:, 0] = 1.0
    block = np.zeros((grid, grid), bool)
    block[:2, :2] = True
    keys[torch.from_numpy(block.reshape(-1)), :] = torch.tensor([0.0, 1.0, 0.0])
    masks = np.stack([np.kron(block, np.ones((4, 4), bool)), np.zeros((size, size), bool)])
    st = obj.stability(keys, grid, masks)
    assert st[0] == 1.0 and st[1] == 0.0


def test_logistic_fit_separates_and_predicts_probabilities():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(obj.FEATURES)))
    y = (x[:, 0] - 0.5 * x[:, 3] > 0).astype(float)
    mean, scale, coef, bias = obj.fit_logistic(x, y)
    model = obj.ObjectnessModel(mean, scale, coef, bias, threshold=0.5)
    p = model.predict(x)
    assert p.min() >= 0 and p.max() <= 1
    assert ((p >= 0.5) == y.astype(bool)).mean() > 0.95
    assert coef[0] > 0 and coef[3] < 0


def test_model_round_trip_threshold_curve_and_fallback(tmp_path):
    n = len(obj.FEATURES)
    model = obj.ObjectnessModel(np.zeros(n), np.ones(n), np.full(n, 0.1), -0.2, 0.4, 0.8, 0.5,
                                curve=((0.0, 0.5), (0.3, 0.79), (0.4, 0.81), (0.6, 0.9)), min_keep=1)
    path = tmp_path / "o.json"
    path.write_text(json.dumps(model.to_dict()))
    back = obj.load(path)
    assert back.fitted and back.prob_power == 0.5 and back.min_keep == 1
    assert np.allclose(back.predict(np.ones((2, n))), model.predict(np.ones((2, n))))
    assert back.threshold_for(None) == 0.4 and back.threshold_for(0.8) == 0.4 and back.threshold_for(0.5) == 0.0
    assert back.threshold_for(0.95) == 0.6  # out of reach: the most precise threshold tried
    fallback = obj.load(tmp_path / "missing.json")
    assert not fallback.fitted and fallback.threshold_for(0.8) == obj.FALLBACK_THRESHOLD
    x = np.zeros((1, n))
    x[0, obj.FEATURES.index("d_final")] = 0.5
    assert fallback.predict(x) == pytest.approx([0.25])  # (1 - d)²
    path.write_text(json.dumps({**model.to_dict(), "features": ["d_final"]}))
    assert not obj.load(path).fitted  # a fit of other features is not used
    with pytest.raises(ValueError, match="threshold"):
        obj.ObjectnessModel.from_dict({**model.to_dict(), "threshold": 2})


def test_the_committed_fit_loads_and_says_how_it_was_made():
    model = obj.load()
    assert model.fitted, "worker/proposals/objectness.json is missing or does not match FEATURES"
    assert 0 < model.threshold < 1 and model.target_precision == pytest.approx(0.8)
    assert "val" in model.meta["fitted_on"] and "val" in model.meta["chosen_on"]
    assert model.curve and all(0 <= t <= 1 and 0 <= p <= 1 for t, p in model.curve)
