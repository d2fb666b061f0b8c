"""Region search quality on the scene world's held-out test split: every ground-truth region is indexed, then
searched by text.

Embeddings per region (the tiny scene CLIP, its native size, MaskInversion 10 steps, lr 0.1):

* ``global``  — the whole image's embedding (every region of an image scores alike),
* ``crop``    — the masked crop alone (pixels outside the mask set to the dataset mean),
* ``let``     — the LET alone (alpha 0),
* ``product`` — what the product indexes: the LET mixed with the masked crop at MASKINV_CROP_WEIGHT's default.

Queries:

* **class names** — each of the world's classes ("red circle") as a prompt-ensembled text query over *all*
  regions of the project; average precision with that class's regions as positives, mean over classes (mAP);
* **referring expressions** with the position words of the world's captions ("the red circle on the left"):
  top-1 within the image (the object the expression names, where no other object of the image fits it), and
  mAP across the project (positives: every region the expression fits); the product embedding with alpha 0
  against alpha ``--alpha`` (the paper's 5 for expressions that need context).

Ranking is exact (cosine over all regions; the embedded store is exact at this size, and its IVF index is
measured by ``benchmarks/search_stores.py``). Seeds fixed (world seed 0, test split scenes 0..N-1).

    nice -n 10 python -m benchmarks.search --scenes 300

Writes benchmarks/results/search_quality.md/.json, benchmarks/results/search.json (with the store numbers of
benchmarks/results/search_stores.json at 10^6 regions) and docs/search_hits.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from training.scene_world import SceneWorld, _where
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip
from worker.jobs.embed import mix_crop
from worker.protocol import DEFAULT_CROP_WEIGHT, DEFAULT_TEMPLATES
from worker.text.labels import LabelScorer

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODEL = "maskinv-scene-tiny"
CHECKPOINT = REPO / "assets" / "tiny_scene_clip" / f"{MODEL}.safetensors"
METHODS = ("global", "crop", "let", "product")


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of ranking by ``scores`` [N] descending, ``positive`` [N] bool (mean precision at each positive)."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def embed_world(scenes: int, alpha: float, steps: int, lr: float, crop_weight: float, threads: int | None):
    """Every region's embedding per method (and the product at ``alpha``), labels, expressions, image index."""
    if threads:
        torch.set_num_threads(threads)
    clip = load_clip(MODEL, str(CHECKPOINT))
    size = int(clip.visual.image_size[0])
    world = SceneWorld(seed=0, image_size=size)
    engine = MaskInversionEngine(clip)
    emb: dict[str, list[np.ndarray]] = {m: [] for m in METHODS + ("product_alpha",)}
    labels, wheres, image_of, boxes, images = [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(scenes):
        sc = world.scene(i, "test")
        masks = np.stack([o.mask for o in sc.objects])
        data = sc.image
        lets = engine.invert(data, masks, size=size, steps=steps, lr=lr, alpha=0.0).lets.numpy()
        lets_a = engine.invert(data, masks, size=size, steps=steps, lr=lr, alpha=alpha).lets.numpy()
        crops = engine.crop_embeddings(data, masks, "masked_crop")[0].numpy()
        emb["global"].append(engine.baseline_embeddings(data, masks, kind="global", size=size).numpy())
        emb["crop"].append(crops)
        emb["let"].append(lets)
        emb["product"].append(mix_crop(lets, crops, crop_weight))
        emb["product_alpha"].append(mix_crop(lets_a, crops, crop_weight))
        for o in sc.objects:
            labels.append(o.label)
            wheres.append(_where(o.centre))
            image_of.append(i)
            ys, xs = np.nonzero(o.mask)
            boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        images.append(sc.image)
    seconds = time.perf_counter() - t0
    out = {m: np.concatenate(v) for m, v in emb.items()}
    out = {m: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for m, v in out.items()}
    scorer = LabelScorer(clip)
    return clip, scorer, out, labels, wheres, np.array(image_of), boxes, images, world.class_names, seconds


def text_vectors(scorer: LabelScorer, texts: Sequence[str]) -> np.ndarray:
    return scorer.prototypes(tuple(texts), DEFAULT_TEMPLATES).cpu().numpy()


def evaluate(scorer, emb, labels, wheres, image_of, classes) -> dict:
    labels_a = np.array(labels)
    q = text_vectors(scorer, classes)
    maps = {}
    for m in METHODS:
        sims = emb[m] @ q.T  # [N, C]
        maps[m] = 100 * float(np.nanmean([average_precision(sims[:, c], labels_a == name)
                                          for c, name in enumerate(classes)]))
    # referring expressions: "the <class> <where>"
    exprs = sorted({f"the {lab} {w}" for lab, w in zip(labels, wheres)})
    ev = text_vectors(scorer, exprs)
    expr_of = np.array([exprs.index(f"the {lab} {w}") for lab, w in zip(labels, wheres)])
    referring = {}
    for key, m in (("alpha0", "product"), ("alpha", "product_alpha"), ("let", "let"), ("crop", "crop"),
                   ("global", "global")):
        sims = emb[m] @ ev.T  # [N, E]
        top1, n = 0.0, 0
        for r in range(len(labels)):
            same = np.nonzero(image_of == image_of[r])[0]
            if (expr_of[same] == expr_of[r]).sum() > 1:
                continue  # the expression fits two objects of the image
            n += 1
            col = sims[same, expr_of[r]]
            best = np.isclose(col, col.max(), rtol=0, atol=1e-6)
            top1 += float(best[same == r][0]) / int(best.sum())  # ties (the global embedding): a random pick
        ap = [average_precision(sims[:, e], expr_of == e) for e in range(len(exprs))]
        referring[key] = {"top1": 100 * top1 / max(n, 1), "map": 100 * float(np.nanmean(ap)), "queries": n}
    return {"map": maps, "referring": referring, "class_queries": len(classes), "expressions": len(exprs)}


def hits_figure(scorer, emb, labels, boxes, images, image_of, queries: Sequence[str], path: Path, k: int = 8) -> None:
    """Top-k product hits (crops, score, true label) of each text query, one row per query."""
    q = text_vectors(scorer, queries)
    tile, head, pad = 96, 18, 4
    font = ImageFont.load_default()
    left = 170
    canvas = Image.new("RGB", (left + k * (tile + pad), len(queries) * (tile + head + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(queries):
        sims = emb["product"] @ q[r]
        y = r * (tile + head + pad)
        draw.text((4, y + tile // 2), f'"{text}"', fill="black", font=font)
        for c, i in enumerate(np.argsort(-sims)[:k]):
            x0, y0, x1, y1 = boxes[i]
            m = 4
            img = images[image_of[i]]
            crop = img.crop((max(0, x0 - m), max(0, y0 - m), min(img.width, x1 + m), min(img.height, y1 + m)))
            crop.thumbnail((tile, tile))
            x = left + c * (tile + pad)
            canvas.paste(crop, (x, y))
            ok = labels[i] in text
            draw.text((x, y + tile + 2), f"{sims[i]:.2f} {labels[i]}"[:18], fill="green" if ok else "red", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


#: crop weights the sweep (``--sweep-crop-weight``) tries: unit(LET) + w x unit(crop); 1e6 is the crop alone
SWEEP_WEIGHTS = (0.0, 0.3, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 1e6)


def crop_weight_sweep(scenes: int, steps: int, lr: float, threads: int | None) -> dict:
    """Class-name mAP of the product embedding at each of :data:`SWEEP_WEIGHTS`, on the val and the test split
    (the weight a search index would use is the val argmax; test reports it)."""
    if threads:
        torch.set_num_threads(threads)
    clip = load_clip(MODEL, str(CHECKPOINT))
    size = int(clip.visual.image_size[0])
    world = SceneWorld(seed=0, image_size=size)
    engine = MaskInversionEngine(clip)
    q = text_vectors(LabelScorer(clip), world.class_names)
    out: dict = {"scenes": scenes, "weights": list(SWEEP_WEIGHTS)}
    for split in ("val", "test"):
        lets, crops, labels = [], [], []
        for i in range(scenes):
            sc = world.scene(i, split)
            masks = np.stack([o.mask for o in sc.objects])
            lets.append(engine.invert(sc.image, masks, size=size, steps=steps, lr=lr).lets.numpy())
            crops.append(engine.crop_embeddings(sc.image, masks, "masked_crop")[0].numpy())
            labels += [o.label for o in sc.objects]
        let_a, crop_a, lab = np.concatenate(lets), np.concatenate(crops), np.array(labels)
        maps = []
        for w in SWEEP_WEIGHTS:
            e = mix_crop(let_a, crop_a, w)
            sims = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ q.T
            maps.append(round(100 * float(np.nanmean([average_precision(sims[:, c], lab == name)
                                                      for c, name in enumerate(world.class_names)])), 1))
        out[split] = maps
    best = int(np.argmax(out["val"]))
    out["chosen_on_val"] = {"weight": SWEEP_WEIGHTS[best], "val": out["val"][best], "test": out["test"][best]}
    return out


def write_sweep(res: dict) -> None:
    (RESULTS / "search_crop_weight.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Region search: the masked crop's weight in the indexed embedding ({res['scenes']} scenes a split)",
             "", "Class-name mAP of unit(LET) + w x unit(masked crop) on the scene world; w = 1e6 is the crop alone. "
             "Made by `python -m benchmarks.search --sweep-crop-weight`.", "",
             "| w | val mAP | test mAP |", "|---:|---:|---:|"]
    lines += [f"| {w:g} | {v:.1f} | {t:.1f} |" for w, v, t in zip(res["weights"], res["val"], res["test"])]
    c = res["chosen_on_val"]
    lines += ["", f"Chosen on val: w = {c['weight']:g} (val {c['val']:.1f}, test {c['test']:.1f}).", ""]
    (RESULTS / "search_crop_weight.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=5.0, help="alpha of the referring row [5, the paper's]")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--crop-weight", type=float, default=DEFAULT_CROP_WEIGHT)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sweep-crop-weight", action="store_true",
                    help="only the crop-weight sweep on val and test (benchmarks/results/search_crop_weight.*)")
    a = ap.parse_args(argv)
    if a.sweep_crop_weight:
        res = crop_weight_sweep(a.scenes, a.steps, a.lr, a.threads)
        write_sweep(res)
        return res
    clip, scorer, emb, labels, wheres, image_of, boxes, images, classes, seconds = embed_world(
        a.scenes, a.alpha, a.steps, a.lr, a.crop_weight, a.threads)
    res = evaluate(scorer, emb, labels, wheres, image_of, classes)
    hits_figure(scorer, emb, labels, boxes, images, image_of,
                ["red circle", "blue star", "the green square on the left"], REPO / "docs" / "search_hits.png")
    config = {"model": MODEL, "size": int(clip.visual.image_size[0]), "steps": a.steps, "lr": a.lr,
              "alpha": a.alpha, "crop_weight": a.crop_weight, "scenes": a.scenes, "regions": len(labels),
              "world_seed": 0, "split": "test", "embed_seconds": round(seconds, 1),
              "host": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"}
    doc = {"config": config, **res}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search_quality.json").write_text(json.dumps(doc, indent=1) + "\n")
    r = res["referring"]
    lines = [f"# Region search quality: scene world (seed 0, test split, {a.scenes} scenes, {len(labels)} regions)",
             "", f"Model `{MODEL}` at {config['size']}×{config['size']}, MaskInversion {a.steps} steps, lr {a.lr}; "
             f"product = LET mixed with the masked crop at weight {a.crop_weight:g}. Text queries are "
             f"prompt-ensembled ({len(DEFAULT_TEMPLATES)} templates). Made by `python -m benchmarks.search`.", "",
             f"**Class-name queries** ({res['class_queries']} classes, each over all {len(labels)} regions):", "",
             "| region embedding | mAP |", "|---|---:|"]
    lines += [f"| {m} | {res['map'][m]:.1f} |" for m in METHODS]
    lines += ["", f"**Referring expressions** (\"the red circle on the left\"; {res['expressions']} distinct, "
              f"top-1 over {r['alpha0']['queries']} objects they name unambiguously in their image):", "",
              "| region embedding | top-1 in the image | mAP across the project |", "|---|---:|---:|"]
    names = {"global": "global", "crop": "masked crop", "let": "LET (alpha 0)", "alpha0": "product, alpha 0",
             "alpha": f"product, alpha {a.alpha:g}"}
    lines += [f"| {names[k]} | {r[k]['top1']:.1f} | {r[k]['map']:.1f} |"
              for k in ("global", "crop", "let", "alpha0", "alpha")]
    lines += ["", "![top hits](../../docs/search_hits.png)", ""]
    (RESULTS / "search_quality.md").write_text("\n".join(lines))
    stores_path = RESULTS / "search_stores.json"
    stores: dict = {}
    if stores_path.exists():
        for row in json.loads(stores_path.read_text())["results"]:
            if row["regions"] == 1_000_000:
                stores.setdefault(row["store"], {})["1000000"] = {
                    "p95_ms": row["p95_ms"], "recall10": row["recall10"], "rss_mb": row["rss_mb"]}
    summary = {"regions": len(labels), "queries": res["class_queries"] + res["expressions"],
               "map": {m: round(res["map"][m], 1) for m in METHODS},
               "referring": {"top1_alpha0": round(r["alpha0"]["top1"], 1),
                             "top1_product": round(r["alpha"]["top1"], 1)},
               "stores": stores}
    (RESULTS / "search.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
