"""Benchmark: the step's GEMMs through torch's BLAS or oneDNN (MASKINV_CPU_GEMM).

Three parts, each alternating its sides within one process (the VM's speed drifts by up to 2× over minutes, so
only side-by-side ratios mean anything):

* the two MLP-side products of the decomposed step, ``[k·n, m] × [m, d]`` and ``[k·n, d] × [d, m]`` (k masks of
  one micro-batch), at each size's token count, BLAS vs oneDNN with the matrix packed: GMAC/s, best of
  ``--repeat``;
* the attention products of one mask, ``[H, n, dh] × [H, dh, n-1]`` (forward) and ``[H, n, n-1] × [H, n-1, dh]``
  (backward), as torch's batched matmul (BLAS) vs one oneDNN linear per head: GMAC/s;
* the trunk's forward pass (every block but the last: what each new image, masked crop and proposal-key pass
  costs), the blocks' own forward (BLAS) vs their linear layers through oneDNN with packed weights
  (:mod:`worker.engine.trunk`), one image: seconds, best of ``--repeat``, and the largest relative difference;
* the warm inversion (cached image, K steps, N masks) of ViT-B/16 with random weights in three engines: ``blas``
  (every product through torch's matmul), ``onednn_mlp`` (the MLP-side GEMMs through oneDNN, the attention
  products batched through BLAS: the engine before per-head oneDNN) and ``onednn`` (both, the default; the
  attention products per head only from :data:`worker.engine.cpu_gemm.ONEDNN_MIN_COLUMNS` patch columns on): best of
  ``--rounds`` runs per engine, and the LETs' minimum cosine to ``blas``.

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
from worker.engine import cpu_gemm
from worker.engine import legrad
from worker.engine import vit
from worker.engine.cpu_gemm import PackedMatrix, onednn_available
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip

RESULTS = Path(__file__).with_name("results")
BACKENDS = ("onednn", "blas")
#: the inversion's engines: (MASKINV_CPU_GEMM, the attention products' column threshold; None = the default)
ENGINES = {"blas": ("blas", None), "onednn_mlp": ("onednn", 10**9), "onednn": ("onednn", None)}


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


def attention_rows(n: int, heads: int, dh: int, repeat: int) -> dict[str, float]:
    """GMAC/s of one mask's attention products, batched BLAS matmul vs one oneDNN linear per head (alternating)."""
    g = torch.Generator().manual_seed(1)
    x, vt = torch.randn(n, heads, dh, generator=g), torch.randn(heads, dh, n - 1, generator=g)
    v_rows = vt.transpose(-1, -2).contiguous()
    pattern = (torch.rand(heads, n, n - 1, generator=g) > 0.5).float()
    col = torch.rand(n - 1, generator=g)
    sides = {
        "fwd blas": lambda: torch.matmul(x.transpose(0, 1), vt),
        "fwd onednn": lambda: [cpu_gemm.linear(x[:, h, :], v_rows[h]) for h in range(heads)],
        "bwd blas": lambda: torch.matmul(pattern, v_rows * col[None, :, None]),
        "bwd onednn": lambda: [cpu_gemm.linear(pattern[h], vt[h] * col) for h in range(heads)],
    }
    times: dict[str, float] = {}
    for r in range(repeat):
        for key in (sides if r % 2 == 0 else list(sides)[::-1]):
            times[key] = min(times.get(key, float("inf")), _best(sides[key], 1))
    return {k: heads * n * (n - 1) * dh / t / 1e9 for k, t in times.items()}


def trunk_rows(visual, size: int, repeat: int) -> dict[str, float]:
    """Seconds of one image's trunk forward under each backend (alternating, best of ``repeat``), and the largest
    difference between the two outputs relative to their largest magnitude."""
    pos = vit.PosEmbedCache(visual).get(size)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    times: dict[str, float] = {}
    outs = {}
    with torch.no_grad():
        for b in BACKENDS:
            outs[b] = vit.trunk_forward(visual, pixels, pos, b)  # packs the weights, warms the allocator
        for r in range(repeat):
            for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                times[b] = min(times.get(b, float("inf")), _best(lambda: vit.trunk_forward(visual, pixels, pos, b),
                                                                 1))
    rel = float((outs["onednn"] - outs["blas"]).abs().max() / outs["blas"].abs().max())
    return {"blas_s": times["blas"], "onednn_s": times["onednn"], "speedup": times["blas"] / times["onednn"],
            "max_rel_diff": rel}


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
    default_columns = cpu_gemm.ONEDNN_MIN_COLUMNS

    def invert(name: str, size: int):
        backend, columns = ENGINES[name]
        cpu_gemm.ONEDNN_MIN_COLUMNS = default_columns if columns is None else columns
        try:
            return engines[backend].invert(img, masks, size=size, steps=a.steps, final_loss=False)
        finally:
            cpu_gemm.ONEDNN_MIN_COLUMNS = default_columns

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    masks = random_masks(a.masks, 480, 640, seed=0)
    rows = []
    for size in a.sizes:
        n = (size // clip.patch_size) ** 2 + 1
        k = min(a.masks, legrad.micro_batch(n, heads, 4))
        rates = gemm_rows(n, d, m, k * n, a.repeat)
        attn = attention_rows(n, heads, d // heads, a.repeat)
        trunk_t = trunk_rows(clip.visual, size, a.repeat)
        for name in ENGINES:  # image state, pos-embed resample, packing
            invert(name, size)
        t: dict[str, list[float]] = {name: [] for name in ENGINES}
        lets = {}
        for r in range(a.rounds):
            for name in (list(ENGINES) if r % 2 == 0 else list(ENGINES)[::-1]):
                t0 = time.perf_counter()
                res = invert(name, size)
                t[name].append(time.perf_counter() - t0)
                lets[name] = res.lets
        best = {name: min(v) for name, v in t.items()}
        row = {"size": size, "n": n, "rows": k * n, "gemm_gmacs": rates, "attention_gmacs": attn, "trunk": trunk_t,
               "heads_onednn": n - 1 >= default_columns, "warm_s": best, "warm_runs": t,
               "speedup": best["blas"] / best["onednn"], "speedup_heads": best["onednn_mlp"] / best["onednn"],
               "min_cos": min(F.cosine_similarity(lets[name], lets["blas"]).min().item()
                              for name in ("onednn", "onednn_mlp"))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"# The step's GEMMs: torch's BLAS vs oneDNN — {a.model}, random weights", "",
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; the sides alternate within one process. MLP products: the step's "
             f"`[k·n, m] × [m, d]` (fwd) and `[k·n, d] × [d, m]` (bwd) for one micro-batch of k masks, BLAS vs "
             f"oneDNN with the matrix packed; attention products of one mask, batched BLAS matmul vs one oneDNN "
             f"linear per head; GMAC/s, best of {a.repeat}. Inversion: warm (cached image), N = {a.masks}, "
             f"K = {a.steps}, best of {a.rounds} per engine: `blas` (all BLAS), `onednn_mlp` (MLP products through "
             "oneDNN, attention batched BLAS), `onednn` (both; the default, attention per head from "
             f"{default_columns} patch columns on).", "",
             "| size | rows k·n | MLP fwd BLAS | MLP fwd oneDNN | MLP bwd BLAS | MLP bwd oneDNN | attn fwd BLAS | "
             "attn fwd oneDNN | attn bwd BLAS | attn bwd oneDNN |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g, h = r["gemm_gmacs"], r["attention_gmacs"]
        lines.append(f"| {r['size']} | {r['rows']} | {g['fwd blas']:.0f} | {g['fwd onednn']:.0f} | {g['bwd blas']:.0f} "
                     f"| {g['bwd onednn']:.0f} | {h['fwd blas']:.0f} | {h['fwd onednn']:.0f} | {h['bwd blas']:.0f} | "
                     f"{h['bwd onednn']:.0f} |")
    lines += ["", "Trunk forward (every block but the last, one image; the blocks' own forward vs packed oneDNN "
              "linear layers, `worker/engine/trunk.py`):", "",
              "| size | BLAS s | oneDNN s | speed-up | max rel. diff |",
              "|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["trunk"]
        lines.append(f"| {r['size']} | {t['blas_s']:.3f} | {t['onednn_s']:.3f} | {t['speedup']:.2f}× | "
                     f"{t['max_rel_diff']:.1e} |")
    lines += ["", "| size | attention per head | warm s blas | warm s onednn_mlp | warm s onednn | onednn vs blas | "
              "onednn vs onednn_mlp | min cos(LET) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        w = r["warm_s"]
        lines.append(f"| {r['size']} | {'yes' if r['heads_onednn'] else 'no'} | {w['blas']:.3f} | "
                     f"{w['onednn_mlp']:.3f} | {w['onednn']:.3f} | {r['speedup']:.2f}× | {r['speedup_heads']:.2f}× | "
                     f"{r['min_cos']:.7f} |")
    lines += ["", "Generated by `python -m benchmarks.bench_cpu_gemm`.", ""]
    out = Path(a.out)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    main()
