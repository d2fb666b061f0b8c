"""Benchmark: the model ladder — time per region and memory of each vision tower on this machine.

Random-init weights at the towers' real sizes (the time and memory do not depend on the weights), one 480×640
colour-block image, random rectangles and ellipses, K AdamW steps at the input size (default 448), ``final_loss``
off as the job functions call it. Per tower: the weights' memory (vision tower; whole model), the image state the
cache keeps per image, the working memory of one mask in a chunk (``mask_bytes``) and how many masks the default
4 GiB chunk budget holds; cold = image-state cache empty (the tower's forward + K steps), warm = cached image
(K steps), best of ``--runs``. Times are the process's CPU seconds (user + system, ``time.process_time``) on
``--threads`` threads (default 1), with the wall seconds beside: on a shared machine the wall time grows with the
other jobs while the CPU time of one thread does not much. Records the load average.

    nice -n 10 python -m benchmarks.bench_backbones                       # B/16, L/14, SigLIP B/16, PE-Core B/16
    nice -n 10 python -m benchmarks.bench_backbones --towers ViT-H-14 --masks 1

Attention-pooled towers whose tokenizer needs the hub (SigLIP) get a random empty-prompt vector instead of the
model's own (the time does not depend on it). Writes ``benchmarks/results/backbones.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from benchmarks.bench_inversion import random_masks
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import clip_from_model, load_clip

RESULTS = Path(__file__).with_name("results")
DEFAULT_TOWERS = ("ViT-B-16", "ViT-L-14", "ViT-B-16-SigLIP", "PE-Core-B-16")


def uptime_load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def build(name: str, seed: int) -> MaskInversionEngine:
    """An engine over ``name`` with random weights; hub tokenizers replaced by a random empty-prompt vector."""
    needs_hub = bool(open_clip.get_model_config(name).get("text_cfg", {}).get("hf_tokenizer_name"))
    if not needs_hub:
        return MaskInversionEngine(load_clip(name, "none", "cpu", seed=seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    clip = clip_from_model(model, name, None, f"{name}/random-seed{seed}")
    empty = torch.randn(clip.embed_dim, generator=torch.Generator().manual_seed(seed))
    return MaskInversionEngine(clip, empty_prompt_embedding=empty)


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def bench_tower(name: str, args: argparse.Namespace, img: Image.Image, masks_all: np.ndarray) -> dict:
    t0 = time.perf_counter()
    eng = build(name, args.seed)
    load_s = time.perf_counter() - t0
    size = args.size - args.size % eng.patch
    vis_bytes = sum(p.numel() * p.element_size() for p in eng.visual.parameters())
    all_bytes = sum(p.numel() * p.element_size() for p in eng.clip.model.parameters())
    eng.invert(img, masks_all[:1], size=size, steps=1)  # warm-up: position embeddings, packed weights, allocator
    state, *_ = eng.image_state(img, size)
    row = {"tower": name, "kind": "attention-pooled" if eng.pooled else "class token", "size": size,
           "patch": eng.patch, "width": eng._width, "heads": eng._heads, "embed_dim": eng.clip.embed_dim,
           "vision_mib": mib(vis_bytes), "model_mib": mib(all_bytes), "state_mib": mib(state.nbytes),
           "mask_mib": mib(eng.mask_bytes(size)), "masks_per_chunk": eng.masks_per_chunk(size), "load_s": load_s,
           "cpu_gemm": eng.cpu_gemm, "steps": args.steps, "rows": []}
    for n in args.masks:
        masks = masks_all[:n]
        cold, warm, cold_wall, warm_wall = [], [], [], []
        for _ in range(args.runs):
            eng.cache.clear()
            t, w = time.process_time(), time.perf_counter()
            eng.invert(img, masks, size=size, steps=args.steps, final_loss=False)
            cold.append(time.process_time() - t)
            cold_wall.append(time.perf_counter() - w)
            t, w = time.process_time(), time.perf_counter()
            eng.invert(img, masks, size=size, steps=args.steps, final_loss=False)
            warm.append(time.process_time() - t)
            warm_wall.append(time.perf_counter() - w)
        r = {"N": n, "cold_s": min(cold), "warm_s": min(warm), "warm_per_region_s": min(warm) / n,
             "cold_runs": cold, "warm_runs": warm, "cold_wall_s": min(cold_wall), "warm_wall_s": min(warm_wall)}
        row["rows"].append(r)
        print(json.dumps({"tower": name, **r}), flush=True)
    del eng
    return row


def write(rows: list[dict], meta: dict, out: Path) -> None:
    lines = [f"# Model ladder: time per region and memory per tower (random init, K={meta['steps']}, "
             f"{meta['size']} px)", "",
             f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, open_clip {meta['open_clip']}; no GPU "
             f"on this host. Load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta['load_end']}. "
             f"Best of {meta['runs']}. CPU seconds of the process (user + system) on {meta['threads']} thread(s); "
             "wall seconds in brackets. cold = the tower's forward + K steps; warm = K steps on the cached image; "
             "per region = warm / N. weights: vision tower (whole CLIP with its text tower); state: the cached "
             "image state; mask: working memory of one mask in a chunk; chunk: masks per chunk under the default "
             "MASKINV_CHUNK_MEMORY_MB=4096.", "",
             "| tower | kind | size | width/heads | D | weights MiB | state MiB | mask MiB | chunk | N | cold CPU s | "
             "warm CPU s | warm CPU s per region |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in rows:
        for r in t["rows"]:
            lines.append(f"| {t['tower']} | {t['kind']} | {t['size']} | {t['width']}/{t['heads']} | {t['embed_dim']} | "
                         f"{t['vision_mib']:.0f} ({t['model_mib']:.0f}) | {t['state_mib']:.1f} | {t['mask_mib']:.1f} | "
                         f"{t['masks_per_chunk']} | {r['N']} | {r['cold_s']:.2f} ({r['cold_wall_s']:.1f}) | "
                         f"{r['warm_s']:.2f} ({r['warm_wall_s']:.1f}) | {r['warm_per_region_s']:.3f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({**meta, "towers": rows}, indent=1))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--towers", nargs="+", default=list(DEFAULT_TOWERS))
    ap.add_argument("--size", type=int, default=448, help="input side (rounded down to the patch size)")
    ap.add_argument("--masks", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is summed over them)")
    ap.add_argument("--out", default=str(RESULTS / "backbones.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    # colour blocks: on fine noise a random-init pool's map can be 0 at the image embedding (flat loss)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480),
                                                                                     Image.Resampling.NEAREST)
    masks_all = random_masks(max(args.masks), 480, 640, seed=args.seed)
    meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "size": args.size, "steps": args.steps, "runs": args.runs,
            "load_start": uptime_load()}
    rows = [bench_tower(name, args, img, masks_all) for name in args.towers]
    meta["load_end"] = uptime_load()
    write(rows, meta, Path(args.out))


if __name__ == "__main__":
    main()
