"""worker.protocol: the job payload and result wire formats, versioning, and interoperation across versions."""

from __future__ import annotations

import numpy as np
import pytest

from worker import protocol
from worker.protocol import (PROTOCOL_VERSION, InversionParams, JobResult, LabelRegionsJob, LabelScore, ProtocolError,
                             RedisKeys, RegionResult, cache_value, encode_image, encode_mask, region_from_cache)


def _mask() -> np.ndarray:
    m = np.zeros((6, 9), bool)
    m[1:4, 2:7] = True
    return m


def _version1_payload(image: bytes, mask: np.ndarray, labels: list[str], params: InversionParams) -> dict:
    """What the version-1 backend (backend/dispatch/dispatchers.py before worker.protocol) assembled by hand."""
    enc = encode_mask(mask)
    return {"image": encode_image(image), "regions": [{"id": enc["sha256"], "mask": enc}],
            "labels": list(labels), "params": params.to_dict()}


def _version1_result() -> dict:
    """A result as the version-1 worker returned it (no "v", "kind" or region "meta"; no "error" on success)."""
    return {"model": {"name": "m", "pretrained": "none", "id": "m/random-seed0"}, "image_sha256": "ab" * 32,
            "regions": [{"id": "r1", "labels": [{"label": "cat", "score": 0.75}], "caption": "a cat",
                         "caption_mode": "retrieval", "error": None},
                        {"id": "r2", "labels": [], "caption": None, "caption_mode": None, "error": "empty mask"}],
            "timings": {"total_s": 0.5}, "cache": {"image_hit": False}, "params": InversionParams().to_dict()}


def test_new_payload_is_the_version1_payload_plus_its_version():
    params = InversionParams(size=64, steps=3)
    old = _version1_payload(b"img", _mask(), ["cat", "dog"], params)
    enc = old["regions"][0]["mask"]
    new = LabelRegionsJob.build(b"img", [(enc["sha256"], enc)], ["cat", "dog"], params).to_dict()
    assert new == {**old, "v": PROTOCOL_VERSION}
    # masks given as arrays encode to the same bits
    assert LabelRegionsJob.build(b"img", [(enc["sha256"], _mask())], ["cat", "dog"], params).to_dict() == new


def test_a_version1_payload_without_v_is_read_as_version_1():
    old = _version1_payload(b"img", _mask(), ["cat"], InversionParams(size=64))
    job = LabelRegionsJob.from_dict(old)
    assert job.v == 1 and job.labels == ("cat",) and job.params == InversionParams(size=64)
    assert job.region_ids() == [old["regions"][0]["id"]]
    assert LabelRegionsJob.from_dict(job.to_dict()) == job


def test_a_newer_payload_version_is_refused_explicitly():
    payload = {**_version1_payload(b"img", _mask(), [], InversionParams()), "v": PROTOCOL_VERSION + 1}
    with pytest.raises(ProtocolError, match=f"protocol version {PROTOCOL_VERSION + 1}.*upgrade the worker"):
        LabelRegionsJob.from_dict(payload)
    with pytest.raises(ProtocolError, match="invalid protocol version"):
        LabelRegionsJob.from_dict({**payload, "v": "1"})


@pytest.mark.parametrize("change, match", [
    ({"labels": ["a", "a"]}, "labels must be unique"),
    ({"labels": ["", "b"]}, "non-empty strings"),
    ({"params": {"steps": "ten"}}, "params.steps"),
    ({"regions": {"id": 1}}, "regions must be a list"),
    ({"image": "bytes"}, "image must be an object"),
])
def test_payload_validation_names_the_field(change, match):
    payload = {**_version1_payload(b"img", _mask(), [], InversionParams()), **change}
    with pytest.raises(ProtocolError, match=match):
        LabelRegionsJob.from_dict(payload)
    with pytest.raises(ProtocolError, match="job must be a dict"):
        LabelRegionsJob.from_dict([payload])


def test_the_new_backend_reads_a_version1_result():
    res = JobResult.from_dict(_version1_result())
    assert res.v == 1 and res.error is None and res.kind == "label_regions"
    assert res.regions[0] == RegionResult("r1", (LabelScore("cat", 0.75),), "a cat", "retrieval")
    assert not res.regions[1].ok and res.regions[1].error == "empty mask"


def test_a_new_result_keeps_every_version1_key_and_value():
    """An old backend reads results with .get(): every key it knew keeps its name and value."""
    old = _version1_result()
    new = JobResult.from_dict(old).to_dict()
    for key, value in old.items():
        if key != "regions":
            assert new[key] == value
    for old_region, new_region in zip(old["regions"], new["regions"]):
        assert {k: new_region[k] for k in old_region} == old_region and new_region["meta"] == {}
    assert "error" not in new  # as version 1 wrote a successful result
    with pytest.raises(ProtocolError, match="upgrade the backend"):
        JobResult.from_dict({**old, "v": PROTOCOL_VERSION + 1})


def test_rejected_results_carry_the_error_on_every_region():
    res = JobResult.rejected("bad image", ["a", "b"], {"id": "m"})
    d = res.to_dict()
    assert d["error"] == "bad image" and [r["error"] for r in d["regions"]] == ["bad image", "bad image"]
    assert JobResult.from_dict(d) == res


@pytest.mark.parametrize("region, match", [
    ({"labels": []}, "has no id"),
    ({"id": "a", "labels": [{"label": "x", "score": float("nan")}]}, "finite number"),
    ({"id": "a", "labels": [{"label": 3, "score": 0.1}]}, "label must be a string"),
    ({"id": "a", "labels": {}}, "labels must be a list"),
    ({"id": "a", "caption": 5}, "caption must be a string"),
    ({"id": "a", "meta": []}, "meta must be an object"),
])
def test_region_validation_names_the_field(region, match):
    with pytest.raises(ProtocolError, match=match):
        RegionResult.from_dict(region)


def test_cache_values_keep_their_version1_form_and_read_back():
    region = RegionResult("r1", (LabelScore("cat", 0.75),), "a cat", "retrieval")
    model = {"name": "m", "pretrained": "none", "id": "m/x", "device": "cpu"}
    value = cache_value(region, model)
    assert value == {"labels": [{"label": "cat", "score": 0.75}], "caption": "a cat", "caption_mode": "retrieval",
                     "model": {"name": "m", "pretrained": "none", "id": "m/x"}}
    assert region_from_cache("r1", value) == region
    assert cache_value(RegionResult.failed("r", "boom"), model) is None
    assert cache_value(RegionResult("r"), model) is None  # no labels: nothing worth caching


def test_job_kinds_name_the_worker_functions_and_the_allow_list():
    assert protocol.job_function("label_regions") == "worker.jobs.regions.label_regions"
    assert protocol.allowed_functions() == frozenset(k.function for k in protocol.JOB_KINDS.values())
    with pytest.raises(ProtocolError, match="unknown job kind"):
        protocol.job_function("rm -rf")
    import importlib

    for kind in protocol.JOB_KINDS.values():  # every kind's plain job function exists in a worker module
        module, _, name = kind.function.rpartition(".")
        assert module.startswith("worker.") and callable(getattr(importlib.import_module(module), name))


def test_redis_key_layout():
    keys = RedisKeys(prefix="p", queue="q")
    assert (keys.workers, keys.worker_models, keys.result("d")) == ("p:workers:q", "p:worker-models:q", "p:result:d")
    assert protocol.region_key("p", "m", "i", "k", "d").startswith("p:result:")


@pytest.mark.parametrize("parse, raw, match", [
    (lambda e: protocol.env_int(e, "X", 1), "ten", "X must be an integer, got 'ten'"),
    (lambda e: protocol.env_int(e, "X", 1, 0, 10), "11", r"X must be in \[0, 10\], got 11"),
    (lambda e: protocol.env_int(e, "X", 1, 0), "-1", "X must be >= 0, got -1"),
    (lambda e: protocol.env_float(e, "X", 1.0), "soon", "X must be a number"),
    (lambda e: protocol.env_float(e, "X", 1.0), "nan", "X must be a finite number"),
    (lambda e: protocol.env_bool(e, "X", True), "maybe", "X must be a boolean"),
    (lambda e: protocol.env_choice(e, "X", "a", ("a", "b")), "c", "X must be one of a, b"),
])
def test_env_parsers_name_the_variable(parse, raw, match):
    with pytest.raises(protocol.SettingError, match=match):
        parse({"X": raw})
    parse({})  # unset: the default
    parse({"X": "  "})  # blank: the default


def test_views_parameter_is_validated_and_implicit_when_one():
    assert "views" not in InversionParams().to_dict()  # an older worker reads a one-view payload unchanged
    two = InversionParams(views=2)
    assert two.to_dict()["views"] == 2 and InversionParams.from_dict(two.to_dict()) == two
    for bad in (0, 3, True, 1.0, "2"):
        with pytest.raises(protocol.PayloadError, match="params.views"):
            InversionParams.from_dict({"views": bad})


def test_embed_and_propose_payloads_round_trip_and_name_bad_fields():
    from worker.protocol import MAX_EMBED_LABELS, EmbedRegionsJob, ExamplePrototypes, ProposeRegionsJob

    job = EmbedRegionsJob.build(b"png", [("a", _mask())], InversionParams(views=2), ["cat"], dtype="float32")
    d = job.to_dict()
    assert d["v"] == PROTOCOL_VERSION and d["params"]["views"] == 2 and d["regions"][0]["id"] == "a"
    assert EmbedRegionsJob.from_dict(d) == job and EmbedRegionsJob.from_dict(d).region_ids() == ["a"]
    text_only = EmbedRegionsJob.build(None, [], InversionParams(), ["cat", "dog"]).to_dict()
    assert "image" not in text_only and EmbedRegionsJob.from_dict(text_only).labels == ("cat", "dog")
    for bad, field in (({**d, "dtype": "int8"}, "dtype"), ({**d, "regions": {}}, "regions"),
                       ({**d, "labels": ["x"] * (MAX_EMBED_LABELS + 1)}, "labels"), ({**d, "image": []}, "image"),
                       ({**d, "v": PROTOCOL_VERSION + 1}, "version"), ([d], "dict")):
        with pytest.raises(ProtocolError, match=field):
            EmbedRegionsJob.from_dict(bad)
    prop = ProposeRegionsJob.build(b"png", ["cat"], InversionParams(), {"max_proposals": 3})
    p = prop.to_dict()
    assert ProposeRegionsJob.from_dict(p) == prop and p["proposals"] == {"max_proposals": 3}
    assert "prototypes" not in p
    protos = {"version": "x", "labels": ["cat"], "weights": {}, "bias": [0.0], "means": {}, "counts": [1]}
    with_protos = ProposeRegionsJob.build(b"png", ["cat"], InversionParams(), None, protos)
    assert with_protos.to_dict()["prototypes"] == protos  # the wire format of the example prototypes is unchanged
    assert ProposeRegionsJob.from_dict(with_protos.to_dict()).prototypes == ExamplePrototypes.from_dict(protos)
    for bad, field in (({**p, "labels": []}, "labels"), ({**p, "labels": ["a", "a"]}, "unique"),
                       ({**p, "proposals": [1]}, "proposals"), ({**p, "params": {"steps": -1}}, "steps"),
                       ({**p, "prototypes": [1]}, "prototypes")):
        with pytest.raises(ProtocolError, match=field):
            ProposeRegionsJob.from_dict(bad)


def test_crop_weight_is_validated_and_implicit_at_zero():
    import math

    import pytest

    from worker.protocol import InversionParams, PayloadError

    assert "crop_weight" not in InversionParams().to_dict()
    p = InversionParams.from_dict({"crop_weight": 0.3})
    assert p.crop_weight == 0.3 and p.to_dict()["crop_weight"] == 0.3
    assert InversionParams.from_dict(p.to_dict()) == p
    for bad in (-0.1, 10.5, math.nan, True, "0.3", None):
        with pytest.raises(PayloadError, match="params.crop_weight"):
            InversionParams.from_dict({"crop_weight": bad})
