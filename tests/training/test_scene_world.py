"""The generated scene world: determinism, exact instance masks, whole-image captions, COCO export and loading."""

from __future__ import annotations

import colorsys
import json
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from benchmarks.coco_regions import AnnotationError, CocoRegions, decode_segmentation
from training.scene_world import COLOURS, PLURALS, SHAPES, SceneWorld, export_coco, make_caption


@pytest.fixture(scope="module")
def world() -> SceneWorld:
    return SceneWorld(seed=3)


@pytest.fixture(scope="module")
def scenes(world):
    return [world.scene(i, "test") for i in range(40)]


def test_vocabulary_is_colour_times_shape(world):
    assert len(world.colours) >= 4 and len(world.shapes) >= 5
    assert set(world.colours) <= set(COLOURS) and set(world.shapes) <= set(SHAPES)
    assert len(world.class_names) == len(set(world.class_names)) == len(world.colours) * len(world.shapes)
    assert "red circle" in world.class_names
    full = SceneWorld(colours=tuple(COLOURS), shapes=SHAPES)
    assert len(full.class_names) == len(COLOURS) * len(SHAPES) == 36
    assert {o.colour for i in range(30) for o in full.scene(i, "test").objects} == set(COLOURS)


def test_scene_is_a_pure_function_of_seed_split_and_index(world, scenes):
    again = SceneWorld(seed=3).scene(7, "test")
    assert np.array_equal(np.asarray(again.image), np.asarray(scenes[7].image))
    assert [o.label for o in again.objects] == [o.label for o in scenes[7].objects]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(again.objects, scenes[7].objects))
    other_split = world.scene(7, "train")
    other_seed = SceneWorld(seed=4).scene(7, "test")
    assert not np.array_equal(np.asarray(other_split.image), np.asarray(scenes[7].image))
    assert not np.array_equal(np.asarray(other_seed.image), np.asarray(scenes[7].image))


def test_twin_keeps_colours_and_background_and_changes_every_shape(world):
    for i in range(12):
        base, twin = world.scene(i, "test"), world.twin(i, "test")
        assert twin.background == base.background
        n = min(len(base.objects), len(twin.objects))
        assert n >= 1 and len(twin.objects) >= len(base.objects) - 1
        assert [o.colour for o in twin.objects[:n]] == [o.colour for o in base.objects[:n]]
        assert len(twin.objects) <= len(base.objects)  # only the objects the scene holds, never more
        assert all(a.shape != b.shape for a, b in zip(base.objects, twin.objects))
        again = SceneWorld(seed=3).twin(i, "test", base=base)
        assert np.array_equal(np.asarray(again.image), np.asarray(twin.image))


def test_binding_twin_moves_colours_between_the_same_shapes_at_the_same_places(world):
    """Same background, shapes and masks; the bags of colours and shapes are kept where a permutation of the
    colours changes the classes, and the classes always change."""
    moved = 0
    for i in range(30):
        base, twin = world.scene(i, "test"), world.binding_twin(i, "test")
        assert twin.background == base.background
        assert [o.shape for o in twin.objects] == [o.shape for o in base.objects]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(base.objects, twin.objects))
        assert sorted(o.label for o in twin.objects) != sorted(o.label for o in base.objects)
        if sorted(o.colour for o in twin.objects) == sorted(o.colour for o in base.objects):
            moved += 1
        again = SceneWorld(seed=3).binding_twin(i, "test", base=base)
        assert np.array_equal(np.asarray(again.image), np.asarray(twin.image))
    assert moved >= 10  # most multi-object scenes keep their colours, only moved


def test_binding_captions_always_name_colours():
    objs = SceneWorld(seed=3).scene(0, "test").objects
    rng = np.random.default_rng(0)
    mentions = [o.mention() for o in objs]
    caps = [make_caption(mentions, "noisy", rng, shape_only=False) for _ in range(200)]
    assert all(any(o.colour in c for o in objs) for c in caps)


def test_objects_have_disjoint_non_touching_masks(world, scenes):
    counts = [len(s.objects) for s in scenes]
    assert min(counts) >= world.min_objects and max(counts) <= world.max_objects
    assert len(set(counts)) >= 3  # 1..4 objects actually occur
    for sc in scenes:
        assert sc.image.size == (world.image_size, world.image_size)
        union = np.zeros((world.image_size, world.image_size), int)
        for obj in sc.objects:
            assert obj.mask.shape == (world.image_size, world.image_size) and obj.mask.dtype == bool
            assert obj.mask.sum() >= 16
            grown = obj.mask.copy()  # the mask grown by one pixel in 4-connectivity
            grown[1:] |= obj.mask[:-1]
            grown[:-1] |= obj.mask[1:]
            grown[:, 1:] |= obj.mask[:, :-1]
            grown[:, :-1] |= obj.mask[:, 1:]
            union += grown
        assert union.max() <= 1


def test_mask_pixels_have_the_objects_colour(scenes):
    """The recorded mask is where the object was painted: the pixels under it have the named hue."""
    checked = 0
    for sc in scenes:
        pix = np.asarray(sc.image, dtype=np.float32) / 255.0
        for obj in sc.objects:
            r, g, b = pix[obj.mask].mean(axis=0)
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            want = COLOURS[obj.colour] / 360.0
            assert min(abs(h - want), 1 - abs(h - want)) < 0.05, (obj.label, h * 360)
            assert s > 0.6 and v > 0.6
            checked += 1
    assert checked > 60


def test_captions_name_every_object_in_varying_order(world, scenes):
    rng = np.random.default_rng(0)
    seen, shape_only = set(), 0
    for sc in scenes:
        for _ in range(5):
            text = world.caption(sc, rng)
            seen.add(text)
            full = all(re.search(rf"\b{o.colour} ({o.shape}|{PLURALS.get(o.shape, o.shape + 's')})\b", text)
                       for o in sc.objects)
            shapes = all(re.search(rf"\b({o.shape}|{PLURALS.get(o.shape, o.shape + 's')})\b", text)
                         for o in sc.objects)
            assert shapes, text
            if not full:  # the shape-only style names no colour at all
                assert not any(re.search(rf"\b{c}\b", text) for c in COLOURS), text
                shape_only += 1
    assert len(seen) > 150  # wording and order vary
    assert 0.1 < shape_only / 200 < 0.4


def test_mirrored_caption_swaps_left_and_right(world):
    sc = next(s for s in (world.scene(i, "test") for i in range(100))
              if len(s.objects) == 1 and s.objects[0].centre[0] < 0.3)
    plain = [world.caption(sc, np.random.default_rng(i)) for i in range(80)]
    mirrored = [world.caption(sc, np.random.default_rng(i), mirrored=True) for i in range(80)]
    def says(word, texts):
        return any(re.search(rf"\b{word}\b", t) for t in texts)

    assert says("left", plain) and not says("right", plain)
    assert says("right", mirrored) and not says("left", mirrored)


def test_bad_world_arguments_are_named():
    with pytest.raises(ValueError, match="max_objects"):
        SceneWorld(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="teal"):
        SceneWorld(colours=("red", "teal"))
    with pytest.raises(ValueError, match="split"):
        SceneWorld().scene(0, "holdout")
    with pytest.raises(ValueError, match="no caption"):
        make_caption([], "noisy", np.random.default_rng(0))


def test_coco_export_round_trips_through_the_loader(tmp_path, world):
    ann = export_coco(world, tmp_path, split="test", count=6)
    doc = json.loads(ann.read_text())
    assert [c["name"] for c in doc["categories"]] == world.class_names
    ds = CocoRegions(ann)
    assert ds.categories == world.class_names
    items = list(ds.images())
    assert len(items) == 6
    for item in items:
        sc = world.scene(int(item.path.stem.split("_")[1]), "test")
        assert [r.category for r in item.regions] == [o.label for o in sc.objects]
        assert all(np.array_equal(r.mask, o.mask) for r, o in zip(item.regions, sc.objects))
        assert item.path.is_file() and (item.width, item.height) == sc.image.size
    multi = list(ds.images(min_regions=2))
    assert all(len(i.regions) >= 2 for i in multi)
    assert len(list(ds.images(limit=2))) == 2


def test_decode_polygon_and_uncompressed_rle():
    square = decode_segmentation([[2, 2, 12, 2, 12, 8, 2, 8]], 20, 30)
    assert square.shape == (20, 30) and 50 <= square.sum() <= 80
    assert square[5, 7] and not square[15, 20]
    m = np.zeros((9, 7), bool)
    m[2:5, 1:6] = True
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    # uncompressed counts, column-major run lengths starting with zeros
    flat = m.flatten(order="F").astype(int)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(decode_segmentation({"size": [9, 7], "counts": runs}, 9, 7), m)
    compressed = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    assert np.array_equal(decode_segmentation(compressed, 9, 7), m)


def test_decode_errors_are_named():
    with pytest.raises(AnnotationError, match="polygon"):
        decode_segmentation([[1, 2, 3, 4]], 10, 10)
    with pytest.raises(AnnotationError, match="unsupported"):
        decode_segmentation(42, 10, 10)
    m = np.ones((4, 4), np.uint8)
    rle = mask_utils.encode(np.asfortranarray(m))
    with pytest.raises(AnnotationError, match="image is 5x5"):
        decode_segmentation({"size": rle["size"], "counts": rle["counts"]}, 5, 5)


def test_loader_checks_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file"):
        CocoRegions(tmp_path / "missing.json")
    (tmp_path / "images").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(AnnotationError, match="categories"):
        CocoRegions(bad)


def test_caption_style_shares_are_configurable_and_checked():
    objs = [o.mention() for o in SceneWorld(seed=3).scene(1, "test").objects]
    rng = np.random.default_rng(1)
    where = ("left", "right", "top", "bottom", "middle")
    default = [make_caption(objs, "noisy", rng) for _ in range(300)]
    more = [make_caption(objs, "noisy", rng, list_share=0.75, position_rate=1.0) for _ in range(300)]
    share = lambda caps: sum(any(w in c for w in where) for c in caps) / len(caps)  # noqa: E731
    assert share(more) > share(default) + 0.3
    with pytest.raises(ValueError, match="list_share"):
        make_caption(objs, "noisy", rng, list_share=0.9)
