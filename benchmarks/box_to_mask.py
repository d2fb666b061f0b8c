"""Boxes and clicks to object masks on the scene world (test split), and what the refined mask does to the label.

For every object of every held-out scene, three prompts: its tight box, the same box jittered (each side moved by
up to ``--jitter`` of the box's size, seeded), and a click on the object pixel nearest its centroid. Each method
(``worker.refine``) turns each prompt into a mask:

* ``prompt``  — the prompt's own mask (the box; a 3-pixel disc for a click), what a region is without refinement;
* ``grabcut`` — OpenCV GrabCut in the box (clicks: in the box of the click's seed region);
* ``seeds``   — the key-affinity seed region the prompt points at;
* ``chosen``  — what the product answers: ``worker.refine.chooser.DEFAULT_METHOD`` with its fallbacks;
* ``oracle``  — per object, the better of grabcut and seeds by IoU with the object (an upper bound, not a
  method: it needs the answer).

Reported per prompt and method: mean mask IoU with the object, the share of objects at IoU ≥ 0.5 and ≥ 0.75, and
the label Acc@1 of the region embedding on that mask (the product's: MaskInversion LET mixed with the masked crop,
``worker.jobs.embed.mix_crop`` at ``MASKINV_CROP_WEIGHT``'s default, as ``benchmarks/region_classification.py``'s
``maskinversion+crop`` row), with the ground-truth mask's Acc@1 as the ceiling. Writes
``benchmarks/results/box_to_mask.{md,json}``.

    python -m benchmarks.box_to_mask --scenes 300
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmarks.region_classification import SCENE_CHECKPOINT, SCENE_MODEL
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip
from worker.jobs.embed import mix_crop
from worker.protocol import DEFAULT_CROP_WEIGHT, DEFAULT_TEMPLATES, RegionPrompt, prompt_mask
from worker.refine import chooser
from worker.refine.chooser import Refiner
from worker.text.labels import LabelScorer

RESULTS = Path(__file__).with_name("results")
PROMPTS = ("box", "jittered box", "click")
METHODS = ("prompt", "grabcut", "seeds", "chosen", "oracle")


@dataclass
class Row:
    """Outcomes of one (prompt, method): per object its IoU with the object and whether its label was right."""

    ious: list[float] = field(default_factory=list)
    right: list[bool] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        iou = np.asarray(self.ious)
        return {"iou": float(iou.mean() * 100), "iou50": float((iou >= 0.5).mean() * 100),
                "iou75": float((iou >= 0.75).mean() * 100), "acc1": float(np.mean(self.right) * 100),
                "ms": self.seconds / max(1, len(self.ious)) * 1000, "objects": len(self.ious)}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def jitter_box(box: Sequence[float], rng: np.random.Generator, amount: float,
               shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Each side moved by a uniform share in [-amount, amount] of the box's width / height, kept in the image."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = rng.uniform(-amount, amount, 4) * np.array([w, h, w, h])
    nx0, ny0 = max(0.0, x0 + d[0]), max(0.0, y0 + d[1])
    nx1, ny1 = min(float(shape[1]), x1 + d[2]), min(float(shape[0]), y1 + d[3])
    return nx0, ny0, max(nx1, nx0 + 1), max(ny1, ny0 + 1)


def centroid_click(mask: np.ndarray) -> tuple[float, float]:
    """The centre of the object pixel nearest the mask's centroid (inside the object even when it is not convex)."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    k = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def evaluate(scenes: int, jitter: float = 0.1, seed: int = 0, size: int = 112, steps: int = 10, lr: float = 0.1,
             crop_weight: float = DEFAULT_CROP_WEIGHT, world_seed: int = 0, progress: bool = False) -> dict:
    from training.scene_world import SceneWorld

    clip = load_clip(SCENE_MODEL, str(SCENE_CHECKPOINT))
    engine = MaskInversionEngine(clip)
    scorer = LabelScorer(clip)
    world = SceneWorld(seed=world_seed, image_size=int(clip.visual.image_size[0]))
    labels = world.class_names
    templates = DEFAULT_TEMPLATES
    scorer.prototypes(labels, templates)
    refiner = Refiner("auto", engine=engine)
    rng = np.random.default_rng(seed)
    rows: dict[tuple[str, str], Row] = {(p, m): Row() for p in PROMPTS for m in METHODS}
    gt = Row()
    it = range(scenes)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="scenes", unit="scene")
    for index in it:
        sc = world.scene(index, "test")
        img = sc.image.convert("RGB")
        shape = (img.height, img.width)
        masks: list[np.ndarray] = []
        slots: list[tuple[Row, int]] = []  # the row and label index each mask's answer goes to
        for obj in sc.objects:
            truth = labels.index(obj.label)
            masks.append(obj.mask)
            slots.append((gt, truth))
            gt.ious.append(1.0)
            box = tight_box(obj.mask)
            prompts = {"box": RegionPrompt(box=box),
                       "jittered box": RegionPrompt(box=jitter_box(box, rng, jitter, shape)),
                       "click": RegionPrompt(points=(centroid_click(obj.mask),))}
            for pname, prompt in prompts.items():
                found: dict[str, np.ndarray] = {}
                for m in METHODS:
                    t0 = time.perf_counter()
                    if m == "prompt":
                        mask = prompt_mask(prompt, shape)
                    elif m == "chosen":  # the default method's mask when usable (as computed above), else its fallbacks
                        mask = (found[chooser.DEFAULT_METHOD]
                                if chooser.usable(found[chooser.DEFAULT_METHOD], prompt, shape)
                                else refiner.refine(img, prompt, refiner.refine_method(), size).mask)
                    elif m == "oracle":
                        mask = max((found["grabcut"], found["seeds"]), key=lambda x: mask_iou(x, obj.mask))
                    else:
                        mask = refiner.run(m, img, prompt, size)
                    rows[(pname, m)].seconds += time.perf_counter() - t0
                    found[m] = mask
                    rows[(pname, m)].ious.append(mask_iou(mask, obj.mask))
                    masks.append(mask)
                    slots.append((rows[(pname, m)], truth))
        # each distinct non-empty mask is inverted once (methods often agree)
        distinct: dict[bytes, int] = {}
        for m in masks:
            if m.any():
                distinct.setdefault(np.packbits(m).tobytes(), len(distinct))
        right = np.zeros(len(masks), bool)
        if distinct:
            unique = [np.zeros(shape, bool)] * len(distinct)
            for m in masks:
                if m.any():
                    unique[distinct[np.packbits(m).tobytes()]] = m
            stack = np.stack(unique)
            res = engine.invert(img, stack, size=size, steps=steps, lr=lr, alpha=0.0)
            crops = engine.crop_embeddings(img, stack, "masked_crop")[0].numpy()
            emb = torch.from_numpy(mix_crop(res.lets.numpy(), crops, crop_weight))
            best = scorer.probabilities(emb, labels, templates).argmax(dim=1).tolist()
            for k, m in enumerate(masks):
                if m.any():
                    right[k] = best[distinct[np.packbits(m).tobytes()]] == slots[k][1]
        for k, (row, _) in enumerate(slots):
            row.right.append(bool(right[k]))
    config = {"model": clip.name, "pretrained": str(Path(clip.pretrained).name), "device": str(clip.device),
              "size": size, "steps": steps, "lr": lr, "crop_weight": crop_weight, "classes": len(labels),
              "scenes": scenes, "world_seed": world_seed, "jitter": jitter, "jitter_seed": seed,
              "default_method": chooser.DEFAULT_METHOD}
    out = {p: {m: rows[(p, m)].summary() for m in METHODS} for p in PROMPTS}
    for p in PROMPTS:  # paired against the prompt's own mask: objects labelled right only with / only without
        base = np.asarray(rows[(p, "prompt")].right)
        for m in METHODS:
            r = np.asarray(rows[(p, m)].right)
            out[p][m] |= {"gained": int((r & ~base).sum()), "lost": int((~r & base).sum())}
    return {"config": config, "ground_truth": gt.summary(), "rows": out}


def to_markdown(report: dict) -> str:
    c, g = report["config"], report["ground_truth"]
    lines = [
        "# Boxes and clicks to masks: scene world",
        "",
        f"Scene world (seed {c['world_seed']}, test split, {c['scenes']} scenes, {g['objects']} objects), model "
        f"`{c['model']}` (`{c['pretrained']}`) on {c['device']}, input {c['size']}, MaskInversion {c['steps']} steps, "
        f"lr {c['lr']}, label embedding = LET mixed with the masked crop (weight {c['crop_weight']:g}), "
        f"{c['classes']} classes. Prompts per object: its tight box; the box with each side moved by up to "
        f"{c['jitter'] * 100:g} % of its size (seed {c['jitter_seed']}); a click on the object pixel nearest its "
        "centroid. `prompt` = the prompt's own mask (the box, a 3-pixel disc); `chosen` = what the product answers "
        f"(`{c['default_method']}` with its fallbacks); `oracle` = per object the better of grabcut and seeds "
        "(needs the answer: an upper bound).",
        "",
        f"Ground-truth mask: Acc@1 **{g['acc1']:.1f}** (the ceiling).",
        "",
        "| prompt | method | mask IoU | IoU ≥ 0.5 | IoU ≥ 0.75 | label Acc@1 | Acc@1 vs prompt | objects gained / "
        "lost vs prompt | ms / prompt |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, methods in report["rows"].items():
        base = methods["prompt"]["acc1"]
        for m, s in methods.items():
            lines.append(f"| {p} | {m} | {s['iou']:.1f} | {s['iou50']:.1f} | {s['iou75']:.1f} | {s['acc1']:.1f} | "
                         f"{s['acc1'] - base:+.1f} | {s.get('gained', '-')} / {s.get('lost', '-')} | {s['ms']:.1f} |")
    lines += ["", "`ms / prompt` is the mask work alone (no inversion), wall-clock on a shared machine: the seed "
              "regions' image keys are computed once per image by the first method that needs them (the box "
              "prompts' seeds pay for them), and `chosen` and `oracle` reuse the masks computed above them (their "
              "time is that of the fallbacks only).",
              "", f"Generated by `python -m benchmarks.box_to_mask --scenes {c['scenes']}` ({platform.machine()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=300, help="held-out scenes [300]")
    ap.add_argument("--jitter", type=float, default=0.1, help="box jitter, share of the box's size per side [0.1]")
    ap.add_argument("--seed", type=int, default=0, help="jitter seed [0]")
    ap.add_argument("--steps", type=int, default=10, help="MaskInversion steps [10]")
    ap.add_argument("--threads", type=int, default=0, help="torch threads [torch's default]")
    ap.add_argument("--out", default=None, help="markdown path [benchmarks/results/box_to_mask.md]")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    report = evaluate(a.scenes, jitter=a.jitter, seed=a.seed, steps=a.steps, progress=True)
    out = Path(a.out) if a.out else RESULTS / "box_to_mask.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(out.read_text())
    return report


if __name__ == "__main__":
    main()
