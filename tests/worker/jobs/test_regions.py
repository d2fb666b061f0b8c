"""Job payload codec (property-based) and the RQ job function on a tiny model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from worker.protocol import (InversionParams, PayloadError, LabelRegionsJob, decode_image, decode_mask, encode_image,
                            encode_mask)


def test_mask_codec_rejects_bad_input():
    enc = encode_mask(np.ones((4, 5), bool))
    with pytest.raises(PayloadError, match="expected 7"):
        decode_mask({**enc, "shape": [10, 5]})
    with pytest.raises(PayloadError, match="sha256"):
        decode_mask({**enc, "shape": [10, 2]})  # same byte count, other shape
    assert decode_mask({k: v for k, v in enc.items() if k != "sha256"} | {"shape": [2, 10]}).shape == (2, 10)
    with pytest.raises(PayloadError, match="positive"):
        decode_mask({**enc, "shape": [0, 5]})
    with pytest.raises(PayloadError, match="malformed"):
        decode_mask({"shape": [4, 5]})
    with pytest.raises(PayloadError, match="2-D"):
        encode_mask(np.ones((2, 2, 2)))


def test_image_codec_checks_hash():
    enc = encode_image(b"abc")
    assert decode_image(enc) == (b"abc", enc["sha256"])
    with pytest.raises(PayloadError, match="sha256"):
        decode_image({**enc, "sha256": "0" * 64})


def test_params_validation():
    assert InversionParams.from_dict(None) == InversionParams()
    p = InversionParams.from_dict({"steps": 3, "alpha": 5.0, "templates": ["a {}"]})
    assert p.steps == 3 and p.templates == ("a {}",)
    assert InversionParams.from_dict(p.to_dict()) == p
    for bad, msg in [({"steps": -1}, "steps"), ({"size": 10}, "size"), ({"lr": 0}, "lr"),
                     ({"templates": ["x"]}, "templates"), ({"foo": 1}, "unknown"), ({"top_k": 0}, "top_k")]:
        with pytest.raises(PayloadError, match=msg):
            InversionParams.from_dict(bad)


@pytest.fixture(scope="module")
def jobs(monkeypatch_module):
    monkeypatch_module.setenv("MASKINV_MODEL", "maskinv-test-tiny")
    monkeypatch_module.setenv("MASKINV_PRETRAINED", "none")
    monkeypatch_module.setenv("MASKINV_DEVICE", "cpu")
    from worker.jobs import regions as module
    from worker.jobs import runtime

    monkeypatch_module.setattr(runtime, "_runtime", None)
    yield module
    runtime._runtime = None


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def png(seed=0, w=60, h=50) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_label_regions(jobs):
    m = np.zeros((50, 60), bool)
    m[5:25, 5:30] = True
    job = LabelRegionsJob.build(png(), [("r1", m), ("r2", np.zeros((50, 60), bool)), ("r3", ~m)], ["cat", "dog", "car"],
                    InversionParams(size=32, top_k=2)).to_dict()
    res = jobs.label_regions(job)
    assert res["model"]["id"] == "maskinv-test-tiny/random-seed0"
    assert [r["id"] for r in res["regions"]] == ["r1", "r2", "r3"]
    r1, r2, r3 = res["regions"]
    assert r1["error"] is None and len(r1["labels"]) == 2 and r1["labels"][0]["score"] >= r1["labels"][1]["score"]
    assert r1["caption"] and r1["labels"][0]["label"] in r1["caption"] and r1["caption_mode"] == "retrieval"
    assert r2["error"] and "empty" in r2["error"] and r2["labels"] == [] and r2["caption"] is None
    assert r3["error"] is None
    assert res["cache"]["image_hit"] is False
    again = jobs.label_regions(job)
    assert again["cache"]["image_hit"] is True and again["cache"]["vit_forwards"] == res["cache"]["vit_forwards"]
    assert again["regions"] == res["regions"]


def test_label_regions_bad_jobs(jobs):
    m = np.ones((4, 4), bool)
    bad_image = LabelRegionsJob.build(b"not an image", [("a", m)], ["cat"], InversionParams(size=32)).to_dict()
    res = jobs.label_regions(bad_image)
    assert "cannot decode image" in res["error"] and res["regions"][0]["error"] == res["error"]
    bad_params = LabelRegionsJob.build(png(), [("a", m)], ["cat"], InversionParams(size=32)).to_dict()
    bad_params["params"]["steps"] = "ten"
    assert "steps" in jobs.label_regions(bad_params)["error"]
    dup = LabelRegionsJob.build(png(), [("a", m)], ["cat", "cat"], InversionParams(size=32)).to_dict()
    assert "unique" in jobs.label_regions(dup)["error"]
    broken_mask = LabelRegionsJob.build(png(), [("a", m), ("b", m)], ["cat"], InversionParams(size=32)).to_dict()
    broken_mask["regions"][1]["mask"]["shape"] = [100, 100]
    res = jobs.label_regions(broken_mask)
    assert res["regions"][0]["error"] is None and "bytes" in res["regions"][1]["error"]
    empty = jobs.label_regions(LabelRegionsJob.build(png(), [], ["cat"], InversionParams(size=32)).to_dict())
    assert empty["regions"] == [] and "error" not in empty
    no_labels = jobs.label_regions(LabelRegionsJob.build(png(), [("a", m)], [], InversionParams(size=32)).to_dict())
    assert no_labels["regions"][0]["labels"] == [] and no_labels["regions"][0]["error"] is None


def test_label_regions_uses_a_configured_clipcap_captioner(tmp_path, monkeypatch):
    from worker.jobs import regions as jobs
    from worker.text.clipcap import ClipCapConfig, save_clipcap
    from training.train_clipcap import build_captioner, tiny_gpt2, train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"a {c} square" for c in ("red", "blue", "green")], vocab_size=280)
    cfg = ClipCapConfig(clip_dim=32, prefix_length=2, mapping="mlp", clip_model={"name": "maskinv-test-tiny"})
    cap = build_captioner(cfg, tiny_gpt2(len(tok), tok.eos_token_id, n_layer=1, n_embd=32, n_head=2, n_positions=16),
                          tok, seed=0)
    path = save_clipcap(cap, tmp_path / "captioner")
    for k, v in {"MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu",
                 "MASKINV_CAPTIONER": str(path), "MASKINV_CAPTION_DECODING": "greedy",
                 "MASKINV_CAPTION_MAX_TOKENS": "6"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("worker.jobs.runtime._runtime", None)  # built with the captioner, undone after the test
    m = np.zeros((50, 60), bool)
    m[5:25, 5:30] = True
    res = jobs.label_regions(LabelRegionsJob.build(
        png(), [("r1", m)], [], InversionParams(size=32, steps=2)).to_dict())
    region = res["regions"][0]
    assert res["model"]["captions"] == "clipcap"
    assert region["caption_mode"] == "clipcap" and isinstance(region["caption"], str)
    assert region["labels"] == []  # no vocabulary: a caption all the same
