"""Benchmark: the step's MLP-side GEMMs through torch's BLAS or oneDNN with a packed matrix (MASKINV_CPU_GEMM).

Two parts, both alternating the two backends within one process (the VM's speed drifts by up to 2× over
minutes, so only side-by-side ratios mean anything):

* the two products of the decomposed step, ``[k·n, m] × [m, d]`` and ``[k·n, d] × [d, m]`` (k masks of one
  micro-batch), at each size's token count: GMAC/s, best of ``--repeat``;
* the warm inversion (cached image, K steps, N masks) of ViT-B/16 with random weights under each backend: best of
  ``--rounds`` runs per side, and the LETs' minimum cosine between the two.

Writes ``benchmarks/results/cpu_gemm.md`` and ``.json``.

    python -m benchmarks.bench_cpu_gemm                  # 224 and 448, N = 10, K = 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.bench_inversion import random_masks
from worker import legrad, vit
from worker.cpu_gemm import PackedMatrix, onednn_available
from worker.engine import MaskInversionEngine
from worker.models import load_clip

RESULTS = Path(__file__).with_name("results")
BACKENDS = ("onednn", "blas")


def _best(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_rows(n: int, d: int, m: int, rows: int, repeat: int) -> dict[str, float]:
    """GMAC/s of the step's two products for ``rows`` rows under each backend (alternating)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m, d, generator=g)
    mats = {b: PackedMatrix(w, b) for b in BACKENDS}
    x_fwd, x_bwd = torch.randn(rows, m, generator=g), torch.randn(rows, d, generator=g)
    times: dict[str, float] = {}
    for r in range(repeat):
        for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
            for kind, fn in (("fwd", lambda: mats[b].mm(x_fwd)), ("bwd", lambda: mats[b].mm(x_bwd, transpose=True))):
                key = f"{kind} {b}"
                times[key] = min(times.get(key, float("inf")), _best(fn, 1))
    return {k: rows * m * d / t / 1e9 for k, t in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--masks", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4, help="warm inversions per backend, alternating [4]")
    ap.add_argument("--repeat", type=int, default=8, help="timed products per backend and shape [8]")
    ap.add_argument("--out", default=str(RESULTS / "cpu_gemm.md"))
    a = ap.parse_args(argv)
    if not onednn_available():
        raise SystemExit("this torch has no oneDNN packed-linear operators: nothing to compare")
    torch.set_num_threads(os.cpu_count() or 1)
    clip = load_clip(a.model, "none", "cpu", seed=0)
    view = vit.last_block(clip.visual)
    d, m, heads = view.width, view.mlp_width, view.heads
    engines = {b: MaskInversionEngine(clip, cpu_gemm=b) for b in BACKENDS}
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    masks = random_masks(a.masks, 480, 640, seed=0)
    rows = []
    for size in a.sizes:
        n = (size // clip.patch_size) ** 2 + 1
        k = min(a.masks, legrad.micro_batch(n, heads, 4))
        rates = gemm_rows(n, d, m, k * n, a.repeat)
        for e in engines.values():  # image state, pos-embed resample, packing
            e.invert(img, masks, size=size, steps=a.steps, final_loss=False)
        t: dict[str, list[float]] = {b: [] for b in BACKENDS}
        lets = {}
        for r in range(a.rounds):
            for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                t0 = time.perf_counter()
                res = engines[b].invert(img, masks, size=size, steps=a.steps, final_loss=False)
                t[b].append(time.perf_counter() - t0)
                lets[b] = res.lets
        row = {"size": size, "n": n, "rows": k * n, "gemm_gmacs": rates,
               "warm_s": {b: min(v) for b, v in t.items()}, "warm_runs": t,
               "speedup": min(t["blas"]) / min(t["onednn"]),
               "min_cos": F.cosine_similarity(lets["onednn"], lets["blas"]).min().item()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"# The step's GEMMs: torch's BLAS vs oneDNN with a packed matrix — {a.model}, random weights", "",
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; both backends alternate within one process. Products: the step's "
             f"`[k·n, m] × [m, d]` (fwd) and `[k·n, d] × [d, m]` (bwd) for one micro-batch of k masks, GMAC/s, best "
             f"of {a.repeat}. Inversion: warm (cached image), N = {a.masks}, K = {a.steps}, best of {a.rounds} "
             "per backend.", "",
             "| size | rows k·n | fwd BLAS | fwd oneDNN | bwd BLAS | bwd oneDNN | warm s BLAS | warm s oneDNN | "
             "speed-up | min cos(LET) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r["gemm_gmacs"]
        lines.append(f"| {r['size']} | {r['rows']} | {g['fwd blas']:.0f} | {g['fwd onednn']:.0f} | {g['bwd blas']:.0f} "
                     f"| {g['bwd onednn']:.0f} | {r['warm_s']['blas']:.3f} | {r['warm_s']['onednn']:.3f} | "
                     f"{r['speedup']:.2f}× | {r['min_cos']:.7f} |")
    lines += ["", "Generated by `python -m benchmarks.bench_cpu_gemm`.", ""]
    out = Path(a.out)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    main()
