"""worker.jobs.store_result: keys, what is cached, the in-memory LRU, Redis storage and the RQ success callback."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from worker.protocol import InversionParams, LabelRegionsJob
from worker.jobs.store_result import (JOB_META_KEY, MemoryResultCache, RedisResultCache, answer_digest, cache_value,
                                 entries_from_result, params_digest, region_key, result_keys, store_job_result)

MODEL = {"name": "m", "pretrained": "none", "id": "m/none", "device": "cpu"}
LABELS = [{"label": "cat", "score": 0.6}, {"label": "dog", "score": 0.4}]


def test_params_digest_normalises_defaults_and_depends_on_labels():
    explicit = InversionParams().to_dict()
    assert params_digest({}, ["a", "b"]) == params_digest(explicit, ["a", "b"])
    assert params_digest({}, ["a", "b"]) != params_digest({}, ["b", "a"])  # label order changes softmax ties
    assert params_digest({"steps": 11}, ["a"]) != params_digest({}, ["a"])
    keys = {region_key("p", "m", "img", "mask", "d"), region_key("p", "m2", "img", "mask", "d"),
            region_key("p", "m", "img2", "mask", "d"), region_key("p", "m", "img", "mask2", "d"),
            region_key("p", "m", "img", "mask", "d2")}
    assert len(keys) == 5 and all(k.startswith("p:result:") for k in keys)


def test_answer_digest_covers_examples_and_caption_mode():
    a = {"version": "v", "labels": ["cat"], "bias": [0.0]}
    digests = {answer_digest({}, ["cat"]), answer_digest({}, ["cat"], a),
               answer_digest({}, ["cat"], {**a, "bias": [0.5]}),  # same version, other content
               answer_digest({}, ["cat"], captions="clipcap"), answer_digest({"views": 2}, ["cat"], a)}
    assert len(digests) == 5
    assert answer_digest({}, ["cat"], {}) == answer_digest({}, ["cat"], None)  # no examples either way
    assert answer_digest({}, ["cat"], dict(reversed(list(a.items())))) == answer_digest({}, ["cat"], a)


def test_only_successful_regions_are_cached():
    assert cache_value({"labels": LABELS, "caption": "c", "caption_mode": "retrieval", "error": None}, MODEL) == {
        "labels": LABELS, "caption": "c", "caption_mode": "retrieval",
        "model": {"name": "m", "pretrained": "none", "id": "m/none"}}
    assert cache_value({"labels": [], "error": "empty mask"}, MODEL) is None
    assert cache_value({"labels": LABELS, "error": "diverged"}, MODEL) is None


def _job_and_result():
    m1, m2 = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    m1[:4] = True
    m2[4:] = True
    job = LabelRegionsJob.build(
        b"image-bytes", [("a", m1), ("b", m2)], ["cat", "dog"], InversionParams(steps=2)).to_dict()
    result = {"model": MODEL, "image_sha256": job["image"]["sha256"],
              "regions": [{"id": "a", "labels": LABELS, "caption": "x", "caption_mode": "retrieval", "error": None},
                          {"id": "b", "labels": [], "caption": None, "caption_mode": None, "error": "empty"}]}
    return job, result


def test_entries_from_result():
    job, result = _job_and_result()
    entries = entries_from_result("p", job, result)
    sha = job["regions"][0]["mask"]["sha256"]
    key = result_keys("p", MODEL, job["image"]["sha256"], [sha], job["params"], job["labels"])[sha]
    assert list(entries) == [key] and entries[key]["labels"] == LABELS
    examples = {"version": "v1", "labels": ["cat"], "bias": [0.0]}
    (scored,) = entries_from_result("p", {**job, "prototypes": examples}, result)
    assert scored == result_keys("p", MODEL, job["image"]["sha256"], [sha], job["params"], job["labels"],
                                 examples)[sha] != key
    assert entries_from_result("p", job, {**result, "error": "rejected"}) == {}
    assert entries_from_result("p", job, {**result, "model": {}}) == {}


def test_memory_cache_lru_and_ttl():
    cache = MemoryResultCache(max_entries=2, ttl_s=3600)
    cache.put_many({"a": {"v": 1}, "b": {"v": 2}})
    assert cache.get_many(["a"]) == [{"v": 1}]  # a is now most recent
    cache.put_many({"c": {"v": 3}})
    assert cache.get_many(["a", "b", "c"]) == [{"v": 1}, None, {"v": 3}]
    short = MemoryResultCache(max_entries=10, ttl_s=0.01)
    short.put_many({"a": {"v": 1}})
    time.sleep(0.05)
    assert short.get_many(["a"]) == [None]
    assert MemoryResultCache(0, 10).get_many(["x"]) == [None]


def test_redis_cache_and_success_callback(redis_conn, redis_ns):
    job, result = _job_and_result()
    rq_job = SimpleNamespace(id="j1", args=(job,), meta={JOB_META_KEY: {"prefix": redis_ns, "ttl_s": 120}})
    store_job_result(rq_job, redis_conn, result)
    (key,) = entries_from_result(redis_ns, job, result)
    assert 0 < redis_conn.ttl(key) <= 120
    cache = RedisResultCache(redis_conn, 120)
    expected = entries_from_result(redis_ns, job, result)[key]
    assert cache.get_many([key, f"{redis_ns}:result:missing"]) == [expected, None]
    # the callback never raises, whatever it gets
    store_job_result(SimpleNamespace(id="j2", args=(), meta=None), redis_conn, result)
    store_job_result(SimpleNamespace(id="j3", args=({"params": {"steps": -5}},), meta=rq_job.meta), redis_conn, result)
    store_job_result(rq_job, redis_conn, "not a dict")
