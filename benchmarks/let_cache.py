"""A changed label set on 100 cached regions: re-scoring cached LETs vs a full re-inversion.

100 regions (scene-world test images of up to 4 objects) go through ``worker.jobs.regions.label_regions`` once with one
label set (this fills the worker's image-state cache and the LET cache). Then the label set changes (a new
vocabulary, as when a project edits its labels) and the same 100 regions are labelled again:

* ``re-invert, warm image cache``: LET cache off, image forward passes still cached (the best case before);
* ``re-invert, cold``: LET cache off and image cache cleared (a restarted worker);
* ``LET cache``: the LETs come from the LET cache; only text prototypes and scoring run;
* ``2 views, re-invert warm``: what a project with examples pays per uncached region (``InversionParams.views
  = 2``, ``MASKINV_EXAMPLE_VIEWS``: the image and its mirror), both views' image states cached, LET cache off.

Models: the committed tiny scene CLIP at 112 px and ViT-B-16 with random weights at 224 px (no hub weights here;
speed does not depend on the weights). Writes ``benchmarks/results/let_cache.{md,json}``.

    python -m benchmarks.let_cache
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

RESULTS = Path(__file__).with_name("results")
LABELS_A = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple") for s in ("circle", "square")]
LABELS_B = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple") for s in ("star", "cross", "triangle")]


def scenes(n_regions: int, size: int) -> list[tuple[bytes, list[np.ndarray]]]:
    """Test scenes of 4 objects (fewer where placement failed) until ``n_regions`` regions."""
    import io

    from training.scene_world import SceneWorld

    world = SceneWorld(seed=0, image_size=size, min_objects=4, max_objects=4)
    out, n, i = [], 0, 0
    while n < n_regions:
        sc = world.scene(i, "test")
        i += 1
        objs = sc.objects[: n_regions - n]
        n += len(objs)
        buf = io.BytesIO()
        sc.image.save(buf, "PNG")
        out.append((buf.getvalue(), [o.mask for o in objs]))
    return out


def runtime(model: str, pretrained: str):
    from worker.jobs import runtime as jobs
    from worker.text.captions import RetrievalCaptioner
    from worker.engine.engine import MaskInversionEngine
    from worker.text.labels import LabelScorer
    from worker.jobs.let_cache import MemoryLetCache
    from worker.engine.models import load_clip

    clip = load_clip(model, pretrained, device="cpu")
    scorer = LabelScorer(clip)
    rt = jobs.Runtime(
        clip=clip,
        engine=MaskInversionEngine(clip),
        scorer=scorer,
        captioner=RetrievalCaptioner(scorer),
        lock=threading.Lock(),
        let_cache=MemoryLetCache(100000, 1 << 30, 3600),
    )
    jobs._runtime = rt
    return rt


def run_all(data, labels, size: int, views: int = 1) -> tuple[float, int, list]:
    from worker.jobs import regions as jobs
    from worker.protocol import InversionParams, LabelRegionsJob

    params = InversionParams(size=size, steps=10, caption=False, views=views)
    t0 = time.perf_counter()
    hits, tops = 0, []
    for image, masks in data:
        res = jobs.label_regions(LabelRegionsJob.build(
            image, [(str(k), m) for k, m in enumerate(masks)], labels, params).to_dict())
        assert not res.get("error"), res.get("error")
        hits += res["cache"]["let_hits"]
        tops += [r["labels"][0]["label"] for r in res["regions"]]
    return time.perf_counter() - t0, hits, tops


def measure(model: str, pretrained: str, size: int, n_regions: int) -> dict:
    from worker.jobs.let_cache import MemoryLetCache

    rt = runtime(model, pretrained)
    data = scenes(n_regions, size if model != "ViT-B-16" else 112)
    n = sum(len(m) for _, m in data)
    run_all(data, LABELS_A, size)  # fill the image and LET caches
    rt.scorer.prototypes(LABELS_B)  # text prototypes of the new labels: the same cost in every variant
    full_cache = rt.let_cache
    rt.let_cache = MemoryLetCache(0, 0, 0)
    warm_s, _, tops_warm = run_all(data, LABELS_B, size)
    rt.engine.cache.clear()
    cold_s, _, _ = run_all(data, LABELS_B, size)
    run_all(data, LABELS_B, size, views=2)  # the mirrored images' forward passes into the image cache
    two_s, _, _ = run_all(data, LABELS_B, size, views=2)
    rt.let_cache = full_cache
    let_s, hits, tops_let = run_all(data, LABELS_B, size)
    same = float(np.mean([a == b for a, b in zip(tops_warm, tops_let)]) * 100)
    return {
        "model": rt.clip.id,
        "size": size,
        "regions": n,
        "images": len(data),
        "reinvert_warm_s": warm_s,
        "reinvert_cold_s": cold_s,
        "two_views_reinvert_warm_s": two_s,
        "let_cache_s": let_s,
        "let_hits": hits,
        "speedup_vs_warm": warm_s / let_s,
        "speedup_vs_cold": cold_s / let_s,
        "same_top1_percent": same,
    }


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "# Changed label set on cached regions: LET cache vs re-inversion",
        "",
        f"{rows[0]['regions']} regions ({rows[0]['images']} scene-world test images of up to 4 objects) labelled once "
        "with 10 labels, then again with 15 other "
        "labels through `worker.jobs.regions.label_regions` (10 steps, lr 0.1, no captions, CPU). Text prototypes of "
        "the "
        "new labels are computed before timing (same in every column).",
        "",
        "| model | size | regions | re-invert, warm image cache (s) | re-invert, cold (s) | LET cache (s) | "
        "LET hits | speed-up vs warm | vs cold | same top-1 | 2 views, re-invert warm (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['model']}` | {r['size']} | {r['regions']} | {r['reinvert_warm_s']:.2f} | "
            f"{r['reinvert_cold_s']:.2f} | {r['let_cache_s']:.3f} | {r['let_hits']} | "
            f"{r['speedup_vs_warm']:.0f}x | {r['speedup_vs_cold']:.0f}x | {r['same_top1_percent']:.0f} % | "
            f"{r['two_views_reinvert_warm_s']:.2f} ({r['two_views_reinvert_warm_s'] / r['reinvert_warm_s']:.2f}x) |"
        )
    lines += [
        "",
        "*2 views*: a project with examples embeds each region on the image and on its mirror "
        "(`MASKINV_EXAMPLE_VIEWS=2`, see `few_shot.md`); the last column is its re-inversion cost with both views' "
        "image states cached (ratio to one view). Cached regions cost the same as with one view (both LETs come "
        "from the LET cache).",
        "",
        f"Generated by `python -m benchmarks.let_cache` ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; shared machine, wall-clock).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regions", type=int, default=100)
    ap.add_argument("--skip-vit-b", action="store_true")
    a = ap.parse_args(argv)
    from benchmarks.region_classification import SCENE_CHECKPOINT, SCENE_MODEL

    rows = [measure(SCENE_MODEL, str(SCENE_CHECKPOINT), 112, a.regions)]
    if not a.skip_vit_b:
        rows.append(measure("ViT-B-16", "none", 224, a.regions))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "let_cache.md").write_text(to_markdown(rows))
    (RESULTS / "let_cache.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(to_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
