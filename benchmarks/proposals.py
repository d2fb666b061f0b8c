"""Proposals nobody drew: class-agnostic recall and auto-tagging AP, COCO-style (pycocotools COCOeval).

For every image, each method proposes masks; recall counts the ground-truth objects that some proposal
covers with mask IoU >= 0.5 / 0.75 (class-agnostic). Auto-tagging turns each kept proposal into a detection
(its best label and that label's probability) and scores them with COCOeval (``iouType="segm"``): AP (IoU
0.50:0.95) and AP50.

Methods (all labelled by the same MaskInversion, K steps at the given input size):

* ``text``     — thresholded LeGrad maps of the text prototypes of the labels the global embedding ranks
  highest (``worker.proposals.pipeline.text_candidates``);
* ``maskcut``  — MaskCut on the last block's keys (``worker.proposals.maskcut``), every component of each round;
* ``keyseeds`` — key-affinity seed regions (``worker.proposals.maskcut.affinity_seeds``): per seed patch, the connected
  patches whose keys are similar to the seed's;
* ``union``    — all three, merged by NMS (the product's default);
* ``sliding_window`` — the baseline every region method must beat: 2×2 and 3×3 grid cells and the whole image;
* ``slic_colour``    — a CLIP-free colour segmentation (SLIC superpixels merged by mean colour on a region
  adjacency graph), to show what this world rewards;
* ``gt_masks``       — an oracle, not a method: the ground-truth masks themselves, labelled and ranked like
  proposals. Its AP is what perfect masks reach with this labeller (a mask set scores above it only by luck of
  the labels).

Each method runs at the patch level (masks on the patch grid) and refined (snapped to SLIC superpixels,
``--refine``); both are reported.

The scene world with the committed tiny CLIP (CPU, a few minutes):

    python -m benchmarks.proposals --scene-world 100

COCO val2017 with real weights on a GPU (same script; categories = the 80 COCO names):

    MASKINV_DEVICE=cuda python -m benchmarks.proposals --model ViT-B-16 --pretrained openai --size 448 \\
        --annotations coco/annotations/instances_val2017.json --images coco/val2017 --max-images 500
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from worker.proposals import objectness as obj
from worker.proposals import pipeline as P
from worker.engine.engine import MaskInversionEngine
from worker.text.labels import LabelScorer
from worker.engine.models import load_clip
from worker.protocol import DEFAULT_TEMPLATES
from worker.protocol import DEFAULT_CROP_WEIGHT

RESULTS = Path(__file__).with_name("results")
DOCS = Path(__file__).resolve().parent.parent / "docs"
REPO = Path(__file__).resolve().parent.parent
SCENE_MODEL = "maskinv-scene-tiny"
SCENE_CHECKPOINT = REPO / "assets" / "tiny_scene_clip" / f"{SCENE_MODEL}.safetensors"
#: the ground-truth-mask ceiling's selection: the fallback objectness (1 - d)², no threshold, at most 20
LEGACY = obj.ObjectnessModel.fallback()
LEGACY_MAX_PROPOSALS = 20
METHODS = ("text", "maskcut", "keyseeds", "union", "sliding_window", "slic_colour", "gt_masks")
#: one setting each (no patch-level / refined pair): the baselines and the oracle
SINGLE_SETTING = ("slic_colour", "sliding_window", "gt_masks")
SOURCES = {"text": ("text",), "maskcut": ("maskcut",), "keyseeds": ("keyseeds",),
           "union": ("maskcut", "keyseeds", "text"),
           "sliding_window": ("window",)}


@dataclass
class Item:
    """One evaluation image: ``image`` (PIL), ground-truth masks ``[N, H, W]`` bool and their category names."""

    image_id: int
    image: Image.Image
    masks: np.ndarray
    categories: list[str]


@dataclass
class MethodRun:
    """One method's outcome over the dataset."""

    best_iou: list[float] = field(default_factory=list)  # per GT object: best IoU of any candidate
    best_iou_kept: list[float] = field(default_factory=list)  # ... of any kept (NMS + threshold + cap) proposal
    multi: list[bool] = field(default_factory=list)  # per GT object: in an image with >= 2 objects
    detections: list[dict] = field(default_factory=list)  # COCO results
    candidates: int = 0
    kept: int = 0
    seconds: float = 0.0

    def recall(self, thr: float, multi_only: bool = True, kept: bool = False) -> float:
        iou = np.asarray(self.best_iou_kept if kept else self.best_iou)
        sel = np.asarray(self.multi) if multi_only else np.ones(len(iou), bool)
        return float((iou[sel] >= thr).mean() * 100) if sel.any() else float("nan")


def to_frame(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Masks ``[N, S, S]`` -> ``[N, H, W]`` bool at the ground truth's resolution (area coverage >= 0.5)."""
    if len(masks) == 0:
        return np.zeros((0, *shape), bool)
    h, w = shape
    if masks.shape[1:] == (h, w):
        return masks.astype(bool)
    out = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.BOX)) >= 128 for m in masks]
    return np.stack(out)


def colour_segments(image: Image.Image, size: int, n_segments: int = 150, thresh: float = 30.0) -> list[np.ndarray]:
    """CLIP-free regions ``[S, S]`` bool: SLIC superpixels merged by mean colour (RAG cut at ``thresh``);
    regions touching two or more image corners (the background) are dropped."""
    from skimage import graph
    from skimage.segmentation import slic

    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
    seg = slic(arr, n_segments=n_segments, compactness=10, start_label=0)
    rag = graph.rag_mean_color(arr, seg)
    merged = graph.cut_threshold(seg, rag, thresh)
    out = []
    for lab in np.unique(merged):
        m = merged == lab
        corners = int(m[0, 0]) + int(m[0, -1]) + int(m[-1, 0]) + int(m[-1, -1])
        if corners < 2 and m.sum() >= 0.002 * size * size:
            out.append(m)
    return out


def _coco_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def run_setting(engine: MaskInversionEngine, scorer: LabelScorer, items: Sequence[Item], methods: Sequence[str],
                labels: Sequence[str], size: int, refine: bool, steps: int, min_score: float, max_proposals: int,
                progress: bool = False, label: bool = True,
                crop_weight: float = DEFAULT_CROP_WEIGHT) -> dict[str, MethodRun]:
    """Every method at one (size, refinement) setting. Each image's candidates of all methods are inverted in
    one batch (a LET depends only on its own mask, so this equals inverting each method's set apart)."""
    cat_id = {name: i + 1 for i, name in enumerate(labels)}
    runs = {m: MethodRun() for m in methods}
    it: Iterable[Item] = items
    if progress:
        from tqdm import tqdm
        it = tqdm(items, desc=f"{'refined' if refine else 'patch'} @{size}", unit="img", leave=False)
    for item in it:
        img = item.image
        seg = P.superpixels(img, size) if refine else None
        per: dict[str, list[P.Candidate]] = {}
        times: dict[str, float] = {}
        for m in methods:
            t = time.perf_counter()
            if m == "slic_colour":
                cands = [P.Candidate(x, "slic") for x in colour_segments(img, size)]
            elif m == "gt_masks":
                cands = [P.Candidate(x, "gt") for x in to_frame(item.masks, (size, size))]
            elif m == "union" and {"maskcut", "keyseeds", "text"} <= set(per):  # already refined
                cands = per["maskcut"] + per["keyseeds"] + per["text"]
            else:
                cands = P.gather_candidates(engine, scorer, img, labels, DEFAULT_TEMPLATES, size, SOURCES[m])
            if seg is not None and m not in SINGLE_SETTING and not (
                    m == "union" and {"maskcut", "keyseeds", "text"} <= set(per)):
                cands = [P.Candidate(P.snap_to_superpixels(c.mask, seg), c.source, c.hint) for c in cands]
            if m != "sliding_window":
                cands = P.dedupe(cands)[:P.MAX_CANDIDATES]
            per[m] = cands
            times[m] = time.perf_counter() - t
        flat = list({id(c): c for m in methods for c in per[m]}.values())  # union shares its members
        t = time.perf_counter()
        labelled = (P.label_candidates(engine, scorer, img, flat, labels, DEFAULT_TEMPLATES, size, steps=steps, top_k=1,
                                       crop_weight=crop_weight) if label else [])
        t_inv = (time.perf_counter() - t) / max(1, len(flat))
        by_id = {id(c): p for c, p in zip(flat, labelled)}  # label_candidates keeps order; failures are rare
        if label and len(labelled) != len(flat):
            by_id = {}
            for p in labelled:
                for c in flat:
                    if c.mask is p.mask:
                        by_id[id(c)] = p
        gt = item.masks
        shape = gt.shape[1:]
        for m in methods:
            run = runs[m]
            cands = per[m]
            mine = [by_id[id(c)] for c in cands if id(c) in by_id]
            if m == "sliding_window":  # the baseline as defined: every window, labelled, no merging (ranked
                kept = [p for p in mine if p.score >= min_score]  # by probability x the fallback objectness)
            elif m == "gt_masks":  # the labeller's ceiling, as defined before the fitted objectness: p x (1 - d)²
                kept = P.select(mine, min_score=min_score, max_proposals=LEGACY_MAX_PROPOSALS, model=LEGACY)
            else:
                kept = P.select(mine, min_score=min_score, max_proposals=max_proposals)
            run.seconds += times[m] + t_inv * len(cands)  # inversion time shared out per candidate
            cand_masks = to_frame(np.stack([c.mask for c in cands]) if cands else np.zeros((0, size, size)), shape)
            kept_masks = to_frame(np.stack([p.mask for p in kept]) if kept else np.zeros((0, size, size)), shape)
            for masks, dest in ((cand_masks, run.best_iou), (kept_masks, run.best_iou_kept)):
                iou = P.mask_iou(gt, masks) if len(masks) else np.zeros((len(gt), 1))
                dest += iou.max(axis=1).tolist()
            run.multi += [len(gt) >= 2] * len(gt)
            run.candidates += len(cands)
            run.kept += len(kept)
            for p, km in zip(kept, kept_masks):
                run.detections.append({"image_id": item.image_id, "category_id": cat_id[p.label],
                                       "segmentation": _coco_rle(km), "score": float(p.rank)})
    return runs


def coco_ap(items: Sequence[Item], labels: Sequence[str], detections: list[dict],
            image_ids: Sequence[int] | None = None) -> tuple[float, float]:
    """(AP, AP50) in percent of ``detections`` against the items' ground truth (COCOeval, segm)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_id = {name: i + 1 for i, name in enumerate(labels)}
    images, anns = [], []
    for it in items:
        h, w = it.masks.shape[1:]
        images.append({"id": it.image_id, "width": w, "height": h})
        for m, c in zip(it.masks, it.categories):
            rle = _coco_rle(m)
            anns.append({"id": len(anns) + 1, "image_id": it.image_id, "category_id": cat_id[c],
                         "segmentation": rle, "area": int(m.sum()), "bbox": _bbox(m), "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": i, "name": n} for n, i in cat_id.items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not detections:
            return 0.0, 0.0
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(gt, dt, iouType="segm")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(max(ev.stats[0], 0) * 100), float(max(ev.stats[1], 0) * 100)


def _bbox(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def scene_items(count: int, seed: int = 0, start: int = 0) -> tuple[list[Item], list[str]]:
    from training.scene_world import SceneWorld

    world = SceneWorld(seed=seed, image_size=112)
    items = []
    for k, index in enumerate(range(start, start + count)):
        sc = world.scene(index, "test")
        items.append(Item(k + 1, sc.image, np.stack([o.mask for o in sc.objects]), [o.label for o in sc.objects]))
    return items, world.class_names


def coco_items(annotations: str, images: str | None, limit: int | None) -> tuple[list[Item], list[str]]:
    from benchmarks.coco_regions import CocoRegions

    ds = CocoRegions(annotations, images)
    items = []
    for k, im in enumerate(ds.images(limit=limit)):
        items.append(Item(k + 1, Image.open(im.path).convert("RGB"), np.stack([r.mask for r in im.regions]),
                          [r.category for r in im.regions]))
    return items, list(ds.categories)


def evaluate(clip, items: list[Item], labels: list[str], sizes: Sequence[int], steps: int, min_score: float,
             max_proposals: int, methods: Sequence[str] = METHODS, progress: bool = True,
             refine_settings: Sequence[bool] = (False, True), label: bool = True,
             crop_weight: float = DEFAULT_CROP_WEIGHT) -> dict:
    engine = MaskInversionEngine(clip)
    scorer = LabelScorer(clip)
    scorer.prototypes(labels, DEFAULT_TEMPLATES)
    multi_ids = [it.image_id for it in items if len(it.masks) >= 2]
    rows = []
    for size in sizes:
        for refine in refine_settings:
            todo = [m for m in methods if not (refine and m in SINGLE_SETTING)]
            runs = run_setting(engine, scorer, items, todo, labels, size, refine, steps, min_score, max_proposals,
                               progress, label, crop_weight)
            for method, run in runs.items():
                nan = (float("nan"), float("nan"))
                ap, ap50 = coco_ap(items, labels, run.detections) if label else nan
                ap_m, ap50_m = coco_ap(items, labels, run.detections, multi_ids) if label else nan
                rows.append({"method": method, "size": size, "refined": refine or method in ("slic_colour", "gt_masks"),
                             "recall50": run.recall(0.5), "recall75": run.recall(0.75),
                             "recall50_kept": run.recall(0.5, kept=True), "recall75_kept": run.recall(0.75, kept=True),
                             "recall50_all": run.recall(0.5, multi_only=False),
                             "ap": ap, "ap50": ap50, "ap_multi": ap_m, "ap50_multi": ap50_m,
                             "candidates_per_image": run.candidates / len(items),
                             "kept_per_image": run.kept / len(items),
                             "ms_per_image": run.seconds / len(items) * 1000})
                print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    objects_multi = sum(len(it.masks) for it in items if len(it.masks) >= 2)
    return {"rows": rows, "images": len(items), "objects_multi": objects_multi,
            "objects_all": sum(len(it.masks) for it in items), "multi_images": len(multi_ids)}


AP_KEYS = ("union", "sliding_window", "slic_colour", "maskcut", "keyseeds", "text", "gt_masks")


def summary_json(report: dict, size: int, refined: bool) -> dict:
    """The summary schema, for one (size, refinement) setting (percent)."""
    def row(method: str, ref: bool | None = None) -> dict:
        ref = refined if ref is None else ref
        if method in SINGLE_SETTING:  # the baselines and the oracle have one setting each
            ref = method != "sliding_window"
        return next(r for r in report["rows"] if r["method"] == method and r["size"] == size and r["refined"] == ref)

    return {"objects": report["objects_multi"],
            "recall50": {m: row(m)["recall50"] for m in ("text", "maskcut", "keyseeds", "union")},
            "recall75": {m: row(m)["recall75"] for m in ("text", "maskcut", "keyseeds", "union")},
            "ap50": {m: row(m)["ap50"] for m in AP_KEYS},
            "ap": {m: row(m)["ap"] for m in AP_KEYS},
            "size": size, "refined": refined}


def to_markdown(report: dict, config: dict, headline: dict) -> str:
    lines = [
        "# Proposals nobody drew: recall and auto-tagging AP",
        "",
        f"{config['dataset']}; model `{config['model']}`; MaskInversion {config['steps']} steps, lr 0.1; "
        f"proposals kept: NMS at mask IoU {P.NMS_IOU}, best-label probability ≥ {config['min_score']}, "
        f"at most {config['max_proposals']} per image. {report['images']} images, {report['objects_all']} objects, "
        f"{report['objects_multi']} of them in {report['multi_images']} multi-object images.",
        "",
        "Recall: share of objects of multi-object images that some candidate of the method covers at mask IoU ≥ "
        "0.5 / 0.75 (class-agnostic, before labelling); *kept*: the same for the proposals that survive NMS, "
        "threshold and cap. AP / AP50: COCOeval (segm) of the kept proposals with their best label, over all "
        "images and over multi-object images. `refined`: masks snapped to SLIC superpixels.",
        "",
        "| method | size | refined | R@0.5 | R@0.75 | R@0.5 kept | R@0.75 kept | R@0.5 all objects | AP | AP50 | "
        "AP (multi) | AP50 (multi) | candidates / img | kept / img | ms / img |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {r['size']} | {'yes' if r['refined'] else 'no'} | {r['recall50']:.1f} | "
                     f"{r['recall75']:.1f} | {r['recall50_kept']:.1f} | {r['recall75_kept']:.1f} | "
                     f"{r['recall50_all']:.1f} | {r['ap']:.1f} | {r['ap50']:.1f} | {r['ap_multi']:.1f} | "
                     f"{r['ap50_multi']:.1f} | {r['candidates_per_image']:.1f} | {r['kept_per_image']:.1f} | "
                     f"{r['ms_per_image']:.0f} |")
    h = headline
    bar_r = h["recall50"]["union"] >= 70
    bar_ap = h["ap50"]["union"] >= h["ap50"]["sliding_window"] + 20
    lines += [
        "",
        f"Bars (size {h['size']}, {'refined' if h['refined'] else 'patch level'}): union recall@0.5 "
        f"{h['recall50']['union']:.1f} % (bar ≥ 70: {'met' if bar_r else 'NOT met'}); auto-tag AP50 union "
        f"{h['ap50']['union']:.1f} vs sliding window {h['ap50']['sliding_window']:.1f} (bar: +20, "
        f"{'met' if bar_ap else 'NOT met'}); the ground-truth masks with the same labels and ranking reach "
        f"{h['ap50']['gt_masks']:.1f} (what perfect masks reach with this labeller).",
        "",
        f"Generated by `python -m benchmarks.proposals {config['argv']}` ({platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads); times are wall-clock on a shared machine.",
        "",
    ]
    return "\n".join(lines)


def figure(clip, items: Sequence[Item], labels: Sequence[str], size: int, refine: bool, path: Path,
           min_score: float, max_proposals: int, n: int = 4, tile: int = 224,
           crop_weight: float = DEFAULT_CROP_WEIGHT) -> Path:
    """Scenes with their kept union proposals outlined and labelled (one row per scene)."""
    from PIL import ImageDraw, ImageFont
    from scipy import ndimage

    engine = MaskInversionEngine(clip)
    scorer = LabelScorer(clip)
    font = ImageFont.load_default(size=12)
    colours = [(255, 0, 0), (0, 200, 255), (255, 255, 0), (0, 255, 0), (255, 0, 255), (255, 128, 0)]
    tiles = []
    for item in [it for it in items if len(it.masks) >= 2][:n]:
        res = P.propose(engine, scorer, item.image, labels, DEFAULT_TEMPLATES, size=size, refine=refine,
                        min_score=min_score, max_proposals=max_proposals, crop_weight=crop_weight)
        base = item.image.convert("RGB").resize((tile, tile), Image.NEAREST)
        canvas = Image.new("RGB", (tile * 2 + 8, tile + 90), (255, 255, 255))
        canvas.paste(base, (0, 0))
        over = np.asarray(base).copy()
        draw_lines = []
        for k, p in enumerate(res.proposals):
            m = np.asarray(Image.fromarray(p.mask.astype(np.uint8) * 255).resize((tile, tile), Image.NEAREST)) > 0
            edge = m & ~ndimage.binary_erosion(m)
            over[edge] = colours[k % len(colours)]
            draw_lines.append((colours[k % len(colours)], f"{p.label} {p.score:.2f} ({p.source})"))
        canvas.paste(Image.fromarray(over), (tile + 8, 0))
        d = ImageDraw.Draw(canvas)
        d.text((2, tile + 2), "truth: " + ", ".join(item.categories), fill=(0, 0, 0), font=font)
        for j, (c, text) in enumerate(draw_lines[:5]):
            d.text((2, tile + 18 + 14 * j), text, fill=tuple(int(v * 0.7) for v in c), font=font)
        tiles.append(canvas)
    out = Image.new("RGB", (sum(t.width for t in tiles) + 8 * len(tiles), tiles[0].height), (255, 255, 255))
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + 8
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--scene-world", type=int, metavar="N", help="evaluate on N test scenes of the scene world")
    src.add_argument("--annotations", help="COCO-style instances JSON")
    ap.add_argument("--images", help="image folder of --annotations")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--start", type=int, default=0, help="first scene index [0]")
    ap.add_argument("--split", default="test", choices=("test", "val"), help="scene-world split [test]")
    ap.add_argument("--model", default=None)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes [112 224 for the scene world]")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--min-score", type=float, default=P.DEFAULT_MIN_SCORE)
    ap.add_argument("--max-proposals", type=int, default=P.DEFAULT_MAX_PROPOSALS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--headline-size", type=int, default=None, help="size of the JSON summary [the largest]")
    ap.add_argument("--out", default=None, help="markdown path [benchmarks/results/proposals.md]")
    ap.add_argument("--figure", default=None, help="PNG of proposals on a few scenes [docs/proposals.png]")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--crop-weight", type=float, default=DEFAULT_CROP_WEIGHT,
                    help=f"masked-crop weight of the candidates' label embeddings [{DEFAULT_CROP_WEIGHT}]")
    ap.add_argument("--refine", choices=("both", "off", "on"), default="both", help="settings to run [both]")
    ap.add_argument("--no-labels", action="store_true", help="class-agnostic recall of the candidates only (no "
                                                              "inversion, no AP)")
    ap.add_argument("--rows", default=None, help="also write the rows as JSON lines to this path")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.scene_world is not None:
        clip = load_clip(a.model or SCENE_MODEL, a.pretrained if a.pretrained is not None else str(SCENE_CHECKPOINT))
        items, labels = scene_items(a.scene_world, start=a.start)
        if a.split == "val":
            from training.scene_world import SceneWorld
            world = SceneWorld(seed=0, image_size=112)
            items = []
            for k, index in enumerate(range(a.start, a.start + a.scene_world)):
                sc = world.scene(index, "val")
                items.append(Item(k + 1, sc.image, np.stack([o.mask for o in sc.objects]),
                                  [o.label for o in sc.objects]))
        dataset = f"Scene world ({a.split} split, scenes {a.start}..{a.start + a.scene_world - 1}, seed 0)"
        sizes = a.sizes or [112, 224]
    else:
        clip = load_clip(a.model, a.pretrained)
        items, labels = coco_items(a.annotations, a.images, a.max_images)
        dataset = Path(a.annotations).name
        sizes = a.sizes or [int(clip.visual.image_size[0])]
    t0 = time.perf_counter()
    refine_settings = {"both": (False, True), "off": (False,), "on": (True,)}[a.refine]
    report = evaluate(clip, items, labels, sizes, a.steps, a.min_score, a.max_proposals, a.methods,
                      refine_settings=refine_settings, label=not a.no_labels, crop_weight=a.crop_weight)
    if a.rows:
        Path(a.rows).write_text("".join(json.dumps(r) + "\n" for r in report["rows"]))
    hsize = a.headline_size or max(sizes)
    config = {"dataset": dataset, "model": clip.id, "steps": a.steps, "min_score": a.min_score,
              "crop_weight": a.crop_weight,
              "max_proposals": a.max_proposals,
              "argv": " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "seconds": time.perf_counter() - t0}
    if set(METHODS) <= set(a.methods) and a.refine == "both" and not a.no_labels:
        head_patch = summary_json(report, hsize, False)
        head_ref = summary_json(report, hsize, True)
        best = head_ref if head_ref["ap50"]["union"] >= head_patch["ap50"]["union"] else head_patch
        doc = {**best, "by_setting": {"patch_level": head_patch, "refined": head_ref}, "config": config,
               "rows": report["rows"]}
        out = Path(a.out) if a.out else RESULTS / "proposals.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(to_markdown(report, config, best))
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        print(out.read_text())
        fig = Path(a.figure) if a.figure else DOCS / "proposals.png"
        print(figure(clip, items, labels, hsize, best["refined"], fig, a.min_score, a.max_proposals,
                     crop_weight=a.crop_weight))
    return report


if __name__ == "__main__":
    main()
