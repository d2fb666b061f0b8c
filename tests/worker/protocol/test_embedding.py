"""A region's embedding on the wire: the payloads' ``embedding`` flag, ``RegionResult.embedding`` round-trips and
validation, and the result cache (its value keeps the embedding, its key says whether the answer has one)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.protocol import (InversionParams, JobResult, LabelRegionsJob, LabelScore, PayloadError,
                             ProposeRegionsJob, ProtocolError, RegionResult, answer_digest, cache_value, encode_mask,
                             entries_from_result, region_from_cache, result_keys)
from worker.protocol.results import embedding_doc

MODEL = {"name": "m", "pretrained": "p", "id": "m/p"}


def region(vec: np.ndarray | None = None) -> RegionResult:
    return RegionResult("r1", (LabelScore("cat", 0.9), LabelScore("dog", 0.1)), "a cat", "retrieval",
                        meta={"margin": 0.8}, embedding=None if vec is None else embedding_doc(vec))


def test_region_result_round_trips_its_embedding_as_float16():
    vec = np.random.default_rng(0).normal(size=16).astype(np.float32)
    r = region(vec)
    doc = r.to_dict()
    assert doc["embedding"]["dtype"] == "float16" and doc["embedding"]["shape"] == [1, 16]
    back = RegionResult.from_dict(doc)
    assert back == r
    np.testing.assert_allclose(back.vector(), vec, rtol=1e-3, atol=1e-3)
    assert "embedding" not in region().to_dict() and region().vector() is None  # absent unless asked for
    job = JobResult(regions=(r,), model=MODEL, image_sha256="img")
    assert JobResult.from_dict(job.to_dict()).regions[0].vector() is not None


@pytest.mark.parametrize("bad, field", [
    ("x", "must be an object"),
    ({"dtype": "int8", "shape": [1, 4], "data": ""}, "dtype"),
    ({"dtype": "float16", "shape": [2, 4], "data": ""}, "shape"),
    ({"dtype": "float16", "shape": [1, 0], "data": ""}, "shape"),
    ({"dtype": "float16", "shape": [1, True], "data": ""}, "shape"),
    ({"dtype": "float16", "shape": [1, 4], "data": 5}, "data"),
])
def test_a_malformed_embedding_is_refused_naming_the_field(bad, field):
    with pytest.raises(ProtocolError, match=field):
        RegionResult.from_dict({"id": "r", "labels": [], "embedding": bad})


def test_an_embedding_that_does_not_decode_fails_when_read():
    r = RegionResult.from_dict({"id": "r", "embedding": {"dtype": "float16", "shape": [1, 4], "data": "AAAA"}})
    with pytest.raises(ProtocolError, match="region r: embedding"):
        r.vector()


def test_payloads_carry_the_flag_only_when_set():
    params = InversionParams(size=64, steps=2)
    plain = LabelRegionsJob.build(b"img", [("a", np.ones((4, 4), bool))], ["cat"], params)
    asked = LabelRegionsJob.build(b"img", [("a", np.ones((4, 4), bool))], ["cat"], params, embedding=True)
    assert "embedding" not in plain.to_dict() and asked.to_dict()["embedding"] is True
    assert LabelRegionsJob.from_dict(asked.to_dict()).embedding is True
    assert LabelRegionsJob.from_dict(plain.to_dict()).embedding is False  # old payloads stay valid
    proposal = ProposeRegionsJob.build(b"img", ["cat"], params, embedding=True)
    assert ProposeRegionsJob.from_dict(proposal.to_dict()).embedding is True
    assert ProposeRegionsJob.from_dict(ProposeRegionsJob.build(b"img", ["cat"], params).to_dict()).embedding is False
    for cls, doc in ((LabelRegionsJob, asked.to_dict()), (ProposeRegionsJob, proposal.to_dict())):
        with pytest.raises(PayloadError, match="embedding must be true or false"):
            cls.from_dict({**doc, "embedding": "yes"})


def test_cache_value_keeps_the_embedding_and_reads_it_back():
    r = region(np.ones(8, np.float32))
    value = cache_value(r, MODEL)
    assert value is not None and value["embedding"] == r.embedding
    assert region_from_cache("r1", value) == r


def test_cache_keys_tell_answers_with_an_embedding_apart():
    params = InversionParams(size=64, steps=2).to_dict()
    assert answer_digest(params, ["cat"]) == answer_digest(params, ["cat"], embedding=False)
    assert answer_digest(params, ["cat"]) != answer_digest(params, ["cat"], embedding=True)
    enc = encode_mask(np.ones((4, 4), bool))
    job = LabelRegionsJob.build(b"img", [("a", enc), ("b", encode_mask(np.eye(4, dtype=bool)))], ["cat"],
                                InversionParams(size=64, steps=2), embedding=True).to_dict()
    with_vec = RegionResult("a", (LabelScore("cat", 1.0),), embedding=embedding_doc(np.ones(8, np.float32)))
    without = RegionResult("b", (LabelScore("cat", 1.0),))  # e.g. from a worker that ignores the flag
    result = JobResult(regions=(with_vec, without), model=MODEL, image_sha256=job["image"]["sha256"])
    entries = entries_from_result("p", job, result)
    key = result_keys("p", MODEL, job["image"]["sha256"], [enc["sha256"]], job["params"], ["cat"],
                      embedding=True)[enc["sha256"]]
    assert list(entries) == [key]  # a hit under the embedding key always has one
    assert "embedding" in entries[key]
    plain_job = {k: v for k, v in job.items() if k != "embedding"}
    assert key not in entries_from_result("p", plain_job, result) and len(entries_from_result("p", plain_job,
                                                                                              result)) == 2
