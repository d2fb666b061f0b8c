"""worker.text.prototypes and backend.learning.fit: the text-anchored probe, the combination rule, the vector format."""

from __future__ import annotations

import numpy as np
import pytest

from backend.learning.fit import class_means, fit_prototypes
from worker.protocol import decode_vectors, encode_vectors
from worker.text.prototypes import combined_logits, normalize


def data(seed=0, n_labels=4, dim=16, per=5):
    rng = np.random.default_rng(seed)
    centres = normalize(rng.normal(size=(n_labels, dim)))
    text = normalize(centres + 0.8 * rng.normal(size=(n_labels, dim)))
    y = np.repeat(np.arange(n_labels), per)
    x = normalize(centres[y] + 0.3 * rng.normal(size=(len(y), dim)))
    return text, x, y, centres


def test_without_examples_it_is_text():
    text, x, *_ = data()
    w, b = fit_prototypes(text, np.zeros((0, 16)), np.zeros(0, int), 20.0)
    np.testing.assert_allclose(w, text, atol=1e-6)
    np.testing.assert_allclose(combined_logits(x, text, 20.0), 20.0 * x @ text.T, rtol=1e-5, atol=1e-5)


def test_examples_improve_accuracy_on_held_out_points():
    text, x, y, centres = data()
    _, xt, yt, _ = data(seed=0, per=40)
    w, b = fit_prototypes(text, x, y, 20.0)
    means, counts = class_means(x, y, 4)
    acc_text = (np.argmax(xt @ text.T, 1) == yt).mean()
    acc_comb = (np.argmax(combined_logits(xt, text, 20.0, w, b, means, counts), 1) == yt).mean()
    assert acc_comb > acc_text


def test_labels_without_examples_keep_their_top1_decisions():
    text, x, y, _ = data(n_labels=6)
    _, xt, _, _ = data(seed=0, n_labels=6, per=30)
    keep = y < 3  # labels 3..5 have no examples
    w, b = fit_prototypes(text, x[keep], y[keep], 20.0)
    means, counts = class_means(x[keep], y[keep], 6)
    comb = combined_logits(xt, text, 20.0, w, b, means, counts)
    t = xt @ text.T
    text_top = np.argmax(t, 1)
    # wherever text picked a label without examples, the combination picks the same
    np.testing.assert_array_equal(np.argmax(comb, 1)[text_top >= 3], text_top[text_top >= 3])
    np.testing.assert_array_equal(w[3:], text[3:].astype(np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_vectors_round_trip(dtype):
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    doc = encode_vectors(x, dtype)
    np.testing.assert_allclose(decode_vectors(doc), x, rtol=1e-3 if dtype == "float16" else 0, atol=1e-3)


@pytest.mark.parametrize("doc, msg", [
    ({"dtype": "int8", "shape": [1, 1], "data": ""}, "dtype"),
    ({"dtype": "float32", "shape": [1], "data": ""}, "shape"),
    ({"dtype": "float32", "shape": [1, 2], "data": "AAAA"}, "bytes"),
    ({"dtype": "float32", "shape": [1, 1], "data": "not base64!"}, "base64"),
    ({"dtype": "float32", "shape": [1, 1], "data": "AADAfw=="}, "non-finite"),
])
def test_bad_vectors_are_refused_with_a_clear_error(doc, msg):
    with pytest.raises(ValueError, match=msg):
        decode_vectors(doc)


def compositional(seed=0, n_a=4, n_b=4, dim=24, per=3, noise=0.35, noise_seed=1):
    """Labels = (a, b) pairs; text = a + b word vectors; vision = a fixed rotation of the same sum, plus noise
    (``seed`` fixes the words and the rotation, ``noise_seed`` the draws)."""
    rng = np.random.default_rng(seed)
    wa, wb = rng.normal(size=(n_a, dim)), rng.normal(size=(n_b, dim))
    pairs = [(i, j) for i in range(n_a) for j in range(n_b)]
    text = normalize(np.stack([wa[i] + wb[j] for i, j in pairs]))
    rot, _ = np.linalg.qr(np.eye(dim) + 0.6 * rng.normal(size=(dim, dim)))
    centres = normalize(text @ rot.T)
    y = np.repeat(np.arange(len(pairs)), per)
    noise_rng = np.random.default_rng(noise_seed)
    x = normalize(centres[y] + noise * noise_rng.normal(size=(len(y), dim)) / np.sqrt(dim))
    return text, x, y


def test_shared_map_moves_only_rows_with_examples_and_off_is_the_per_label_probe():
    text, x, y = compositional()
    keep = y < 10
    w, b = fit_prototypes(text, x[keep], y[keep], 20.0)
    np.testing.assert_array_equal(w[10:], text[10:].astype(np.float32))
    np.testing.assert_array_equal(b[10:], 0)
    assert np.abs(w[:10] - text[:10]).max() > 1e-3
    w0, _ = fit_prototypes(text, x, y, 20.0, shared_anchor=None)
    w1, _ = fit_prototypes(text, x, y, 20.0, shared_anchor=1e9)  # a pull that strong keeps M at ~0
    np.testing.assert_allclose(w0, w1, atol=1e-4)


def test_shared_map_teaches_across_labels_that_share_words():
    text, x, y = compositional(per=2)
    _, xt, yt = compositional(per=40, noise_seed=2)  # held-out points of the same labels

    def acc(w, b):
        return (np.argmax(xt @ w.T + b, 1) == yt).mean()

    shared = acc(*fit_prototypes(text, x, y, 20.0))
    own = acc(*fit_prototypes(text, x, y, 20.0, shared_anchor=None))
    assert shared > own + 0.05, (shared, own)


def test_vision_prototypes_lean_on_mapped_text_with_few_examples_and_on_the_mean_with_many():
    from backend.learning.fit import vision_prototypes

    text, x, y = compositional(per=1, noise=1.0)
    keep = y != 5  # label 5 has no example
    protos, counts = vision_prototypes(text, x[keep], y[keep])
    assert counts[5] == 0 and not protos[5].any() and counts[0] == 1
    np.testing.assert_allclose(np.linalg.norm(protos[counts > 0], axis=1), 1, atol=1e-5)
    _, xt, yt = compositional(per=40, noise=1.0, noise_seed=2)
    ok = yt != 5
    acc = (np.argmax(xt[ok] @ protos.T, 1) == yt[ok]).mean()
    means, _ = class_means(x[keep], y[keep], len(text))
    assert acc > (np.argmax(xt[ok] @ means.T, 1) == yt[ok]).mean() + 0.1, acc  # one example each: the map helps
    # many examples: the plain class mean
    _, xm, ym = compositional(per=400, noise_seed=3)
    protos_m, _ = vision_prototypes(text, xm, ym, prior=1.0)
    means_m, _ = class_means(xm, ym, len(text))
    assert (protos_m * means_m).sum(1).min() > 0.999
    # no examples: zero rows, zero counts
    empty, c0 = vision_prototypes(text, np.zeros((0, text.shape[1])), np.zeros(0, int))
    assert not empty.any() and not c0.any()
