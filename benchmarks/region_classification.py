"""Region classification (the MaskInversion paper's Table 2 protocol) on COCO-style instance annotations.

For every annotated region of every image, each method gives one embedding, which is classified among all
category names by cosine with prompt-ensembled text prototypes (``worker.text.labels.LabelScorer``):

* ``maskinversion`` — the LET of the region's mask (``engine.invert``, alpha 0),
* ``global``        — the whole image's embedding,
* ``crop``          — the embedding of the crop of the mask's box,
* ``masked_crop``   — the same crop with the pixels outside the mask set to the dataset mean,
* ``maskinversion+crop`` — the product's region embedding: the LET mixed with the masked crop (at the model's
  native size) by ``worker.jobs.embed.mix_crop`` with weight ``--crop-weight`` (default
  ``MASKINV_CROP_WEIGHT``'s, 0.3); ``--crop-sweep W ...`` adds one row per weight (to choose it, on ``--split
  val``).

Acc@1 and Acc@5 are reported over all regions, over regions in images with two or more regions (where one
image embedding cannot be right for all of them) and over single-region images. A markdown table is written to
``benchmarks/results/`` (with a JSON beside it).

The generated scene world with the committed tiny model (CPU, about a minute):

    python -m benchmarks.region_classification --scene-world 300

Any COCO-format dataset with real weights (e.g. COCO val2017 with ViT-B/16 on a GPU):

    python -m benchmarks.region_classification --model ViT-B-16 --pretrained openai --size 224 \\
        --annotations coco/annotations/instances_val2017.json --images coco/val2017 --min-area 1024

Environment: MASKINV_DEVICE picks the device (see worker.engine.models); the engine's own variables apply.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from benchmarks.coco_regions import CocoRegions, ImageRegions
from worker.jobs.embed import mix_crop
from worker.engine.engine import MaskInversionEngine
from worker.text.labels import LabelScorer
from worker.engine.models import ClipModel, load_clip
from worker.protocol import DEFAULT_TEMPLATES
from worker.protocol import DEFAULT_CROP_WEIGHT

RESULTS = Path(__file__).with_name("results")
REPO = Path(__file__).resolve().parent.parent
SCENE_MODEL = "maskinv-scene-tiny"
SCENE_CHECKPOINT = REPO / "assets" / "tiny_scene_clip" / f"{SCENE_MODEL}.safetensors"
METHODS = ("maskinversion", "global", "crop", "masked_crop", "maskinversion+crop")
GROUPS = ("all", "multi", "single")  # all regions; images with >= 2 regions; images with one region


@dataclass
class MethodStats:
    """Per-region outcomes of one method: rank of the true class (0 = top-1) and the image's region count."""

    ranks: list[int] = field(default_factory=list)
    regions_in_image: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def accuracy(self, k: int, group: str = "all") -> float:
        r = np.asarray(self.ranks)
        n = np.asarray(self.regions_in_image)
        sel = {"all": np.ones_like(n, bool), "multi": n >= 2, "single": n == 1}[group]
        return float((r[sel] < k).mean() * 100) if sel.any() else float("nan")

    def count(self, group: str = "all") -> int:
        n = np.asarray(self.regions_in_image)
        return int({"all": len(n), "multi": (n >= 2).sum(), "single": (n == 1).sum()}[group])


@dataclass
class Report:
    stats: dict[str, MethodStats]
    images: int
    dice_before: float  # mean Dice+reg loss of the LETs at step 0 (= the global embedding's map)
    dice_after: float  # ... after the K steps
    config: dict


def _ranks(scorer: LabelScorer, emb: torch.Tensor, labels: Sequence[str], templates: Sequence[str],
           truth: Sequence[int]) -> list[int]:
    """Rank ``[N]`` of each region's true class under ``emb`` ``[N, D]`` (0 = best)."""
    probs = scorer.probabilities(emb, labels, templates)  # [N, L]
    true_p = probs[torch.arange(len(truth)), torch.as_tensor(truth)]
    return (probs > true_p[:, None]).sum(dim=1).tolist()


def evaluate(clip: ClipModel, items: Iterable[ImageRegions], labels: Sequence[str], size: int, steps: int = 10,
             lr: float = 0.1, methods: Sequence[str] = METHODS, templates: Sequence[str] = DEFAULT_TEMPLATES,
             progress: bool = False, crop_weight: float = DEFAULT_CROP_WEIGHT,
             crop_sweep: Sequence[float] = ()) -> Report:
    """Classify every region of ``items`` with each method; returns the per-method outcomes (``crop_sweep``:
    extra rows ``maskinversion+crop w=<w>``, from the same LETs and crops)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {METHODS}")
    engine = MaskInversionEngine(clip)
    scorer = LabelScorer(clip)
    scorer.prototypes(labels, templates)
    index = {name: i for i, name in enumerate(labels)}
    stats = {m: MethodStats() for m in methods}
    sweep = [float(w) for w in crop_sweep]
    for w in sweep:
        stats[f"maskinversion+crop w={w:g}"] = MethodStats()
    mixed = "maskinversion+crop" in methods or bool(sweep)
    before, after, n_images = [], [], 0
    it = items
    if progress:
        from tqdm import tqdm
        it = tqdm(items, desc="images", unit="img")
    for item in it:
        data = item.path.read_bytes()
        masks = np.stack([r.mask for r in item.regions])  # [N, H, W]
        truth = [index[r.category] for r in item.regions]
        n = len(item.regions)
        n_images += 1
        lets, let_s, crops = None, 0.0, None  # shared by the rows of this image that need them
        for m in methods:
            t0 = time.perf_counter()
            shared = 0.0  # the LETs' time, when another row computed them
            if m in ("maskinversion", "maskinversion+crop"):
                shared = let_s
                if lets is None:
                    res = engine.invert(data, masks, size=size, steps=steps, lr=lr, alpha=0.0)
                    lets = res.lets
                    ok = [e is None for e in res.errors]
                    before += res.losses[0][ok].tolist()
                    after += res.losses[-1][ok].tolist()
                    let_s = time.perf_counter() - t0
                emb = lets
                if m == "maskinversion+crop":
                    crops = engine.crop_embeddings(data, masks, "masked_crop")[0].numpy()
                    emb = torch.from_numpy(mix_crop(lets.numpy(), crops, crop_weight))
            else:
                emb = engine.baseline_embeddings(data, masks, kind=m, size=size)
            ranks = _ranks(scorer, emb, labels, templates, truth)
            stats[m].seconds += time.perf_counter() - t0 + shared
            stats[m].ranks += ranks
            stats[m].regions_in_image += [n] * n
        if sweep:
            if lets is None:
                lets = engine.invert(data, masks, size=size, steps=steps, lr=lr, alpha=0.0).lets
            if crops is None:
                crops = engine.crop_embeddings(data, masks, "masked_crop")[0].numpy()
            for w in sweep:
                st = stats[f"maskinversion+crop w={w:g}"]
                st.ranks += _ranks(scorer, torch.from_numpy(mix_crop(lets.numpy(), crops, w)), labels, templates,
                                   truth)
                st.regions_in_image += [n] * n
    config = {"model": clip.name, "pretrained": clip.pretrained, "model_id": clip.id, "device": str(clip.device),
              "size": size, "steps": steps, "lr": lr, "alpha": 0.0, "classes": len(labels),
              "templates": len(templates), **({"crop_weight": crop_weight} if mixed else {})}
    return Report(stats=stats, images=n_images, dice_before=float(np.mean(before)) if before else float("nan"),
                  dice_after=float(np.mean(after)) if after else float("nan"), config=config)


def to_markdown(report: Report, dataset: str) -> str:
    c = report.config
    s0 = next(iter(report.stats.values()))
    lines = [
        f"# Region classification: {dataset}",
        "",
        f"Model `{c['model']}` (`{c['pretrained']}`) on {c['device']}, input {c['size']}×{c['size']}, "
        f"{c['classes']} classes, {c['templates']} prompt templates; MaskInversion {c['steps']} steps, "
        f"lr {c['lr']}, alpha 0" + (f"; maskinversion+crop: masked-crop weight {c['crop_weight']:g} (crop at the "
                                    "model's native size)." if "crop_weight" in c else "."),
        f"{report.images} images, {s0.count('all')} regions ({s0.count('multi')} in images with ≥ 2 regions, "
        f"{s0.count('single')} alone). Mean Dice loss of the LETs' maps: {report.dice_before:.3f} at step 0 "
        f"(the global embedding) → {report.dice_after:.3f} after {c['steps']} steps.",
        "",
        "| method | Acc@1 | Acc@5 | Acc@1 (≥ 2 regions) | Acc@5 (≥ 2 regions) | Acc@1 (1 region) | ms / region |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, st in report.stats.items():
        ms = st.seconds / max(1, st.count()) * 1000
        lines.append(f"| {m} | {st.accuracy(1):.1f} | {st.accuracy(5):.1f} | {st.accuracy(1, 'multi'):.1f} | "
                     f"{st.accuracy(5, 'multi'):.1f} | {st.accuracy(1, 'single'):.1f} | {ms:.1f} |")
    lines += ["", f"Generated by `python -m benchmarks.region_classification` ({platform.machine()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads); times are wall-clock on a shared "
              "machine.", ""]
    return "\n".join(lines)


def to_json(report: Report, dataset: str) -> dict:
    return {"dataset": dataset, "images": report.images, "config": report.config,
            "dice_before": report.dice_before, "dice_after": report.dice_after,
            "methods": {m: {f"acc{k}_{g}": st.accuracy(k, g) for k in (1, 5) for g in GROUPS}
                        | {f"regions_{g}": st.count(g) for g in GROUPS} | {"seconds": st.seconds}
                        for m, st in report.stats.items()}}


# ---------------------------------------------------------------------- explainability figure
_CMAP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)  # dark->bright


def heatmap(values: np.ndarray) -> np.ndarray:
    """``[H, W]`` values in [0, 1] -> RGB ``[H, W, 3]`` uint8 (a dark-to-bright colour ramp)."""
    x = np.clip(values, 0, 1) * (len(_CMAP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_CMAP) - 2)
    t = (x - lo)[..., None]
    return (_CMAP[lo] * (1 - t) + _CMAP[lo + 1] * t).astype(np.uint8)


def explainability_figure(clip: ClipModel, items: Iterable[ImageRegions], labels: Sequence[str], size: int,
                          path: str | Path, steps: int = 10, lr: float = 0.1, max_regions: int = 8,
                          tile: int = 160) -> Path:
    """Save a figure: per region, the image, its mask, the map E of the global embedding (the LET at step 0)
    and E of the LET after ``steps`` steps, with the top-1 label of each embedding."""
    from PIL import Image, ImageDraw, ImageFont

    engine = MaskInversionEngine(clip)
    scorer = LabelScorer(clip)
    rows = []
    for item in items:
        data = item.path.read_bytes()
        masks = np.stack([r.mask for r in item.regions])
        res = engine.invert(data, masks, size=size, steps=steps, lr=lr)
        e0 = engine.explain(data, res.global_embedding[None].repeat(len(masks), 1), size=size)
        ek = engine.explain(data, res.lets, size=size)
        top_g = scorer.score(res.global_embedding[None], labels, top_k=1)[0][0]
        top_l = scorer.score(res.lets, labels, top_k=1)
        img = Image.open(item.path).convert("RGB").resize((tile, tile), Image.BICUBIC)
        for j, r in enumerate(item.regions):
            m = Image.fromarray(r.mask.astype(np.uint8) * 255).resize((tile, tile), Image.NEAREST)
            maps = [Image.fromarray(heatmap(e[j].cpu().numpy())).resize((tile, tile), Image.BILINEAR)
                    for e in (e0, ek)]
            text = (f"true: {r.category}\nglobal: {top_g[0]} ({top_g[1]:.2f})\n"
                    f"LET: {top_l[j][0][0]} ({top_l[j][0][1]:.2f})\n"
                    f"loss {float(res.losses[0, j]):.2f} -> {float(res.losses[-1, j]):.2f}")
            rows.append(([img, m.convert("RGB"), *maps], text))
            if len(rows) >= max_regions:
                break
        if len(rows) >= max_regions:
            break
    font = ImageFont.load_default(size=max(11, tile // 11))
    text_w, pad, head = int(tile * 1.6), 4, 24
    canvas = Image.new("RGB", (4 * (tile + pad) + text_w, head + len(rows) * (tile + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(("image", "mask", "E(global), step 0", f"E(LET), step {steps}")):
        draw.text((c * (tile + pad) + 4, 4), title, fill=(0, 0, 0), font=font)
    for r, (tiles, text) in enumerate(rows):
        y = head + r * (tile + pad)
        for c, t in enumerate(tiles):
            canvas.paste(t, (c * (tile + pad), y))
        draw.multiline_text((4 * (tile + pad) + 6, y + 6), text, fill=(0, 0, 0), font=font, spacing=4)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def main(argv: Sequence[str] | None = None) -> Report:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--annotations", help="COCO-style instances JSON")
    src.add_argument("--scene-world", type=int, metavar="N",
                     help="export N held-out scenes of the scene world (test split) and evaluate on them")
    ap.add_argument("--images", help="image folder [<annotations folder>/images]")
    ap.add_argument("--world-seed", type=int, default=0, help="scene world seed [0]")
    ap.add_argument("--model", default=None, help=f"open_clip model [{SCENE_MODEL} with --scene-world, "
                                                  "else MASKINV_MODEL]")
    ap.add_argument("--pretrained", default=None,
                    help="pretrained tag or checkpoint [the committed tiny checkpoint with --scene-world, "
                         "else MASKINV_PRETRAINED]")
    ap.add_argument("--size", type=int, default=None, help="input size [the model's native image size]")
    ap.add_argument("--steps", type=int, default=10, help="MaskInversion steps [10]")
    ap.add_argument("--lr", type=float, default=0.1, help="MaskInversion learning rate [0.1]")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--crop-weight", type=float, default=DEFAULT_CROP_WEIGHT,
                    help=f"weight of the masked crop in maskinversion+crop [{DEFAULT_CROP_WEIGHT}]")
    ap.add_argument("--crop-sweep", type=float, nargs="*", default=(),
                    help="also report maskinversion+crop at each of these weights")
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="scene-world split [test; val to choose settings]")
    ap.add_argument("--min-area", type=int, default=0, help="skip regions with fewer mask pixels [0]")
    ap.add_argument("--max-images", type=int, default=None, help="evaluate at most this many images")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    ap.add_argument("--out", default=None, help="markdown path [benchmarks/results/region_classification_<name>.md]")
    ap.add_argument("--figure", default=None, help="also save an explainability figure (PNG) of the first regions "
                                                   "of images with >= 2 regions")
    ap.add_argument("--figure-regions", type=int, default=8, help="regions in the figure [8]")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    tmp = None
    if a.scene_world is not None:
        from training.scene_world import SceneWorld, export_coco

        model = a.model or SCENE_MODEL
        pretrained = a.pretrained if a.pretrained is not None else str(SCENE_CHECKPOINT)
        clip = load_clip(model, pretrained)
        native = int(clip.visual.image_size[0])
        tmp = tempfile.TemporaryDirectory(prefix="scene_world_")
        world = SceneWorld(seed=a.world_seed, image_size=native)
        ann = export_coco(world, tmp.name, split=a.split, count=a.scene_world)
        ds = CocoRegions(ann)
        dataset = f"scene world (seed {a.world_seed}, {a.split} split, {a.scene_world} scenes)"
        name = "scene_world" if a.split == "test" else f"scene_world_{a.split}"
    else:
        clip = load_clip(a.model, a.pretrained)
        ds = CocoRegions(a.annotations, a.images, min_area=a.min_area)
        dataset = f"{Path(a.annotations).name}" + (f" (regions ≥ {a.min_area} px)" if a.min_area else "")
        name = Path(a.annotations).stem
    size = a.size or int(clip.visual.image_size[0])
    try:
        if a.figure:
            print(explainability_figure(clip, ds.images(min_regions=2), ds.categories, size, a.figure, steps=a.steps,
                                        lr=a.lr, max_regions=a.figure_regions))
        report = evaluate(clip, ds.images(limit=a.max_images), ds.categories, size=size, steps=a.steps, lr=a.lr,
                          methods=a.methods, progress=True, crop_weight=a.crop_weight, crop_sweep=a.crop_sweep)
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = Path(a.out) if a.out else RESULTS / f"region_classification_{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(report, dataset))
    out.with_suffix(".json").write_text(json.dumps(to_json(report, dataset), indent=2) + "\n")
    print(out.read_text())
    return report


if __name__ == "__main__":
    main()
