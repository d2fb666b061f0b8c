"""The committed tiny scene CLIP labels regions of multi-object scenes correctly (a regression net for the
engine, the label scorer and the checkpoint loader), and the benchmark harness runs end to end."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

from benchmarks import region_classification as rc
from benchmarks.coco_regions import CocoRegions
from training.scene_world import SceneWorld, export_coco
from worker.engine.engine import MaskInversionEngine
from worker.text.labels import LabelScorer
from worker.engine.models import load_clip

CHECKPOINT = rc.SCENE_CHECKPOINT
pytestmark = pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"{CHECKPOINT} is not committed")


@pytest.fixture(scope="module")
def clip():
    return load_clip(rc.SCENE_MODEL, str(CHECKPOINT), device="cpu")


@pytest.fixture(scope="module")
def world(clip) -> SceneWorld:
    return SceneWorld(seed=0, image_size=int(clip.visual.image_size[0]))


@pytest.fixture(scope="module")
def multi_object_set(tmp_path_factory, world) -> tuple[list[str], list]:
    """A fixed subset: the held-out (test split) scenes among the first 60 with 2 or more objects."""
    regions = CocoRegions(export_coco(world, tmp_path_factory.mktemp("scenes"), split="test", count=60))
    return regions.categories, list(regions.images(min_regions=2))


def test_checkpoint_loads_through_open_clip_and_load_clip(clip):
    model, _, preprocess = open_clip.create_model_and_transforms(rc.SCENE_MODEL, pretrained=str(CHECKPOINT))
    ref = dict(model.named_parameters())
    for name, p in clip.model.named_parameters():
        assert torch.equal(p.cpu(), ref[name].detach())
    grid = clip.visual.grid_size
    assert grid[0] >= 7 and grid[1] >= 7
    assert clip.id.startswith(rc.SCENE_MODEL + "/")


def test_single_objects_are_recognised_from_the_whole_image(clip, world):
    """The model was trained: one-object scenes are classified from the global embedding."""
    engine, scorer = MaskInversionEngine(clip), LabelScorer(clip)
    scenes = [s for s in (world.scene(i, "test") for i in range(80)) if len(s.objects) == 1][:12]
    size = int(clip.visual.image_size[0])
    emb = engine.embed_images([s.image for s in scenes], size=size)
    top = scorer.score(emb, world.class_names, top_k=1)
    correct = sum(t[0][0] == s.objects[0].label for t, s in zip(top, scenes))
    assert correct >= 0.75 * len(scenes), f"{correct}/{len(scenes)}"


def test_maskinversion_beats_the_global_embedding_on_multi_object_scenes(clip, multi_object_set):
    """MaskInversion labels most regions of multi-object scenes right, 20 points above the global embedding (on
    these 131 regions with the committed model: Acc@1 51.9 vs 22.1, i.e. 68 right where "most" needs 66, Acc@5
    91.6; Dice 0.75 -> 0.63; the full benchmark, 663 regions: 41.2 vs 20.7; see docs/scene_world.md). A broken
    engine, scorer or loader falls to the global embedding's level or below."""
    categories, items = multi_object_set
    n_regions = sum(len(i.regions) for i in items)
    assert n_regions >= 100
    report = rc.evaluate(clip, items, categories, size=int(clip.visual.image_size[0]),
                         methods=("maskinversion", "global"))
    acc_mi = report.stats["maskinversion"].accuracy(1, "multi")
    acc_global = report.stats["global"].accuracy(1, "multi")
    assert acc_mi > 50.0, f"MaskInversion Acc@1 {acc_mi:.1f} on {n_regions} regions: not most of them"
    assert acc_mi >= acc_global + 20.0, f"MaskInversion {acc_mi:.1f} vs global {acc_global:.1f}"
    assert report.stats["maskinversion"].accuracy(5, "multi") >= 80.0
    assert report.dice_after < report.dice_before - 0.10
    md = rc.to_markdown(report, "test subset")
    assert "| maskinversion |" in md and "| global |" in md


def test_benchmark_command_writes_a_table(tmp_path):
    out = tmp_path / "rc.md"
    report = rc.main(["--scene-world", "3", "--out", str(out), "--methods", "maskinversion", "crop"])
    text = out.read_text()
    assert "| maskinversion |" in text and "| crop |" in text and "| global |" not in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["methods"]["maskinversion"]["regions_all"] == report.stats["crop"].count() > 0
    assert np.isfinite(data["dice_after"])


def test_diagnostics_show_shapes_and_binding_in_the_whole_image(clip, world):
    """The committed model tells a scene from its shape twin and from its binding twin by their captions (val
    split), and MaskInversion reads the region's colour far better than the global embedding does."""
    from benchmarks import scene_diagnostics as sd

    twins = sd.twin_discrimination(clip, world, scenes=40)
    assert twins["shape"] >= 85.0 and twins["binding"] >= 75.0, twins
    readouts = sd.region_readouts(clip, world, scenes=30)
    assert readouts["maskinversion"]["regions"] >= 40
    assert readouts["maskinversion"]["colour"] >= readouts["global"]["colour"] + 15.0, readouts
