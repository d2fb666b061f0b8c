"""worker.protocol.prototypes: the example prototypes a label or propose job carries, typed, wire format unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from worker.protocol import (ExamplePrototypes, InversionParams, LabelRegionsJob, PayloadError, answer_digest,
                             encode_vectors)


def _doc() -> dict:
    """A document as backend.learning builds it: two labels with examples, D = 4."""
    rng = np.random.default_rng(0)
    return {"version": "abc123", "labels": ["cat", "dog"], "weights": encode_vectors(rng.normal(size=(2, 4))),
            "bias": [0.5, -0.25], "means": encode_vectors(rng.normal(size=(2, 4))), "counts": [3, 1]}


def test_a_document_round_trips_exactly():
    doc = _doc()
    protos = ExamplePrototypes.from_dict(doc)
    assert protos.to_dict() == doc and protos.labels == ("cat", "dog") and protos.counts == (3, 1)
    assert protos.weight_vectors().shape == (2, 4) and protos.mean_vectors().dtype == np.float32
    assert ExamplePrototypes.optional(None) is None and ExamplePrototypes.optional(protos) is protos


def test_build_from_arrays_matches_the_document():
    doc = _doc()
    rng = np.random.default_rng(0)
    built = ExamplePrototypes.build("abc123", ["cat", "dog"], rng.normal(size=(2, 4)), [0.5, -0.25],
                                    rng.normal(size=(2, 4)), [3, 1])
    assert built.to_dict() == doc


def test_payloads_carry_the_typed_prototypes_and_the_same_cache_digest():
    doc = _doc()
    job = LabelRegionsJob.build(b"img", [("a", np.ones((4, 4), bool))], ["cat", "dog"], InversionParams(), doc)
    wire = job.to_dict()
    assert wire["prototypes"] == doc
    assert LabelRegionsJob.from_dict(wire).prototypes == ExamplePrototypes.from_dict(doc)
    params = wire["params"]
    assert answer_digest(params, ["cat"], ExamplePrototypes.from_dict(doc)) == answer_digest(params, ["cat"], doc)


@pytest.mark.parametrize("change, field", [
    ({"labels": "cat"}, "prototypes.labels"),
    ({"labels": ["cat", 3]}, "prototypes.labels"),
    ({"weights": [1.0]}, "prototypes.weights"),
    ({"means": None}, "prototypes.means"),
    ({"bias": [0.5]}, "prototypes.bias"),
    ({"bias": [0.5, float("nan")]}, "prototypes.bias"),
    ({"bias": [0.5, True]}, "prototypes.bias"),
    ({"counts": [1]}, "prototypes.counts"),
    ({"counts": [1, -1]}, "prototypes.counts"),
])
def test_a_malformed_document_names_its_field(change, field):
    with pytest.raises(PayloadError, match=field):
        ExamplePrototypes.from_dict({**_doc(), **change})
    job = LabelRegionsJob.build(b"img", [], ["cat"], InversionParams()).to_dict()
    with pytest.raises(PayloadError, match=field):
        LabelRegionsJob.from_dict({**job, "prototypes": {**_doc(), **change}})


def test_vectors_that_do_not_decode_to_one_row_per_label_are_refused():
    protos = ExamplePrototypes.from_dict({**_doc(), "weights": encode_vectors(np.zeros((3, 4)))})
    with pytest.raises(PayloadError, match="prototypes.weights must have 2 rows"):
        protos.weight_vectors()
    with pytest.raises(PayloadError, match="prototypes.means"):
        ExamplePrototypes.from_dict({**_doc(), "means": {"dtype": "int8"}}).mean_vectors()
    with pytest.raises(PayloadError, match="prototypes must be an object"):
        ExamplePrototypes.from_dict([1])
