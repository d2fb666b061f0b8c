"""The tiny scene CLIP's training script: twin batches, binding captions, embedding-scale calibration, a run."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from training import train_tiny_clip as ttc
from worker.engine.models import load_clip, register_project_configs


@pytest.fixture(scope="module")
def pool() -> ttc.ScenePool:
    return ttc.render_pool({"seed": 5, "image_size": 112}, 6, twins=ttc.TWINS, workers=1)


def test_pool_rows_are_scenes_followed_by_their_twins(pool):
    assert pool.group == 3 and len(pool) == 18
    assert pool.bound == [False, False, True] * 6  # only binding twins must bind colours in captions
    for i in range(6):
        scene, shape_twin, binding_twin = pool.objects[3 * i: 3 * i + 3]
        assert [m.label.split()[0] for m in shape_twin] == [m.label.split()[0] for m in scene][:len(shape_twin)]
        assert [m.label.split()[1] for m in binding_twin] == [m.label.split()[1] for m in scene]
        assert sorted(m.label for m in binding_twin) != sorted(m.label for m in scene)


def test_batches_keep_groups_together_and_bind_colours_for_binding_twins(pool):
    batches = ttc.Batches(pool, 6, seed=0, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
    seen = set()
    for _ in range(3):
        pixels, captions = batches.next()
        assert pixels.shape == (6, 3, 112, 112) and len(captions) == 6
        for k in (2, 5):  # each group's third row is a binding twin: every caption names a colour
            assert any(c in captions[k] for c in ("red", "yellow", "green", "blue", "purple")), captions[k]
        seen.add(tuple(captions))
    assert len(seen) == 3


def test_calibration_sets_the_embedding_rms_and_changes_no_direction():
    register_project_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("maskinv-scene-tiny").eval()
    pixels = torch.randn(8, 3, 112, 112)
    with torch.no_grad():
        before = model.encode_image(pixels)
    factor = ttc.calibrate_embedding_scale(model, pixels, 0.45)
    with torch.no_grad():
        after = model.encode_image(pixels)
    assert after.pow(2).mean().sqrt().item() == pytest.approx(0.45, rel=1e-4)
    assert torch.allclose(after, before * factor, rtol=1e-4, atol=1e-6)
    assert torch.allclose(F.normalize(after, dim=-1), F.normalize(before, dim=-1), atol=1e-5)


def test_a_short_run_writes_a_checkpoint_the_worker_loads(tmp_path):
    out = tmp_path / "tiny.safetensors"
    ttc.main(["--steps", "2", "--pool", "4", "--batch", "6", "--workers", "1", "--warmup", "1",
              "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 2 and record["world"]["twins"] == ["shape", "binding"]
    assert record["embed_rms"] == 0.45 and record["proj_factor"] > 0
    clip = load_clip("maskinv-scene-tiny", str(out), device="cpu")
    with torch.no_grad():
        emb = clip.model.encode_image(torch.randn(4, 3, 112, 112))
    assert np.isfinite(emb.numpy()).all()


def test_batch_must_hold_whole_groups():
    with pytest.raises(SystemExit):
        ttc.main(["--batch", "8", "--steps", "1"])  # 8 is not a multiple of 3 (a scene and its two twins)


def test_a_time_budgeted_run_stops_at_its_budget_and_records_its_steps(tmp_path):
    out = tmp_path / "tiny.safetensors"
    ttc.main(["--minutes", "0.05", "--pool", "4", "--batch", "6", "--workers", "1", "--warmup", "1",
              "--embed-rms", "0", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["minutes"] == 0.05 and record["steps"] >= 1
    assert record["train_s"] < 3 + 30  # the budget (3 s) plus one step of this size, with room for a slow machine


def test_learning_rate_warms_up_then_decays_over_the_schedule():
    assert ttc.lr_at(0, 1.0, 10, 0.0) == pytest.approx(0.1)
    assert ttc.lr_at(10, 1.0, 10, 0.0) == pytest.approx(1.0)
    assert ttc.lr_at(500, 1.0, 10, 0.5) == pytest.approx(0.5)  # half of the steps, or of the time budget, done
    assert ttc.lr_at(900, 1.0, 10, 1.5) == pytest.approx(0.0)  # a time budget overrun by the last step
