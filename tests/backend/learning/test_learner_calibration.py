"""The learner's calibration: from the project's examples, cached per example set, recomputed when they change."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from backend.learning import learner as learning
from backend.learning.examples import Example, SqliteExampleStore
from backend.settings import Settings
from worker.protocol import InversionParams

DIM = 8
LABELS = ("cat", "dog", "fox")


def make_learner(store, monkeypatch, env=None) -> learning.Learner:
    settings = Settings.from_env({"MASKINV_SIZE": "64", "MASKINV_STEPS": "2", **(env or {})})
    learner = learning.Learner(settings, SimpleNamespace(), SimpleNamespace(), lambda xml: None, lambda: (None, None),
                               lambda: {"id": "m"}, store=store)
    monkeypatch.setattr(learner, "text_prototypes", lambda labels, params, model_id: (np.eye(len(labels), DIM), 20.0))
    return learner


def add(store, learner, annotations: range) -> None:
    key = learning.model_key({"id": "m"}, learner.example_params(InversionParams(size=64, steps=2)))
    rng = np.random.default_rng(annotations.start)
    for a in annotations:
        store.replace_annotation("1", f"a{a}", [
            Example(f"a{a}-r{i}", lab, key, (np.eye(DIM)[i] + 0.05 * rng.normal(size=DIM)).astype(np.float32))
            for i, lab in enumerate(LABELS)])


def test_calibration_is_cached_per_example_set_and_recomputed_when_it_changes(tmp_path, monkeypatch):
    store = SqliteExampleStore(tmp_path / "ex.sqlite3")
    learner = make_learner(store, monkeypatch)
    params = InversionParams(size=64, steps=2)
    assert learner.calibration("1", LABELS, params) is None  # no examples yet
    add(store, learner, range(4))
    few = learner.calibration("1", LABELS, params)
    assert few is not None and few.thresholds == {}  # 4 examples per label: not enough evidence
    calls = []
    real = learning.calibrate_examples
    monkeypatch.setattr(learning, "calibrate_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    add(store, learner, range(4, 16))
    first = learner.calibration("1", LABELS, params)
    assert first is not None and set(first.thresholds) == set(LABELS) and first.target == 0.95
    assert learner.calibration("1", LABELS, params) == first and len(calls) == 1  # cached


def test_the_target_precision_is_a_setting(tmp_path, monkeypatch):
    store = SqliteExampleStore(tmp_path / "ex.sqlite3")
    learner = make_learner(store, monkeypatch, {"MASKINV_TRUST_PRECISION": "0.8"})
    add(store, learner, range(12))
    cal = learner.calibration("1", LABELS, InversionParams(size=64, steps=2))
    assert cal is not None and cal.target == 0.8
