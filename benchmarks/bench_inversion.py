"""Benchmark: decomposed MaskInversion (cold and warm image) against the autograd reference.

The ViT-B/16 architecture, random-initialised (weights do not change the cost), on all CPU threads (or the GPU
when present). For each input size and number of masks N it times:

* cold     — image-state cache empty: one ViT forward + K decomposed steps for N masks,
* warm     — the same image again (cached forward pass): K decomposed steps only,
* autograd — the reference: the image repeated per mask, the ViT re-run and ∂s/∂A taken by autograd with
             create_graph at every step (run for N <= --autograd-max-n; it is slow).

Also measures the machine's fp32 matmul rate and reports the decomposed path's MACs per mask-step against it.
Writes ``benchmarks/results/inversion.md`` (and ``.json``).

    python benchmarks/bench_inversion.py                        # full run (~10 min on 2 cores)
    python benchmarks/bench_inversion.py --sizes 224 --masks 1 10 --model maskinv-test-tiny   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip

RESULTS = Path(__file__).with_name("results")


class PeakRSS:
    """Peak resident memory above the starting point while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def matmul_gmacs(n: int = 2048, repeat: int = 5) -> float:
    """Measured fp32 matmul rate of this machine in GMAC/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return repeat * n**3 / (time.perf_counter() - t0) / 1e9


def decomposed_macs_per_mask_step(n: int, d: int, m: int) -> float:
    """MACs of one decomposed step for one mask: the map (MLP VJP n·m·d, out-proj n·d², ∂s/∂A n·(n-1)·d)
    and its backward to the LET (the same products once more)."""
    return 2.0 * (n * m * d + n * d * d + n * (n - 1) * d)


def random_masks(n_masks: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """``[N, H, W]`` random rectangles and ellipses covering 3-40 % of the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n_masks, h, w), bool)
    for i in range(n_masks):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.1, 0.35) * h, rng.uniform(0.1, 0.35) * w
        if i % 2:
            out[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            out[i] = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    return out


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return out, dt, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default="none", help="'none' = random init (the default here)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--masks", type=int, nargs="+", default=[1, 10, 50, 100])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--autograd-max-n", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "inversion.md"))
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    clip = load_clip(args.model, args.pretrained)
    engine = MaskInversionEngine(clip)
    block = clip.visual.transformer.resblocks[-1]
    d, m = block.attn.embed_dim, block.mlp.c_fc.out_features
    rate = matmul_gmacs() if clip.device.type == "cpu" else float("nan")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    masks_all = random_masks(max(args.masks), 480, 640)
    rows = []
    for size in args.sizes:
        n_tok = (size // clip.patch_size) ** 2 + 1
        engine.invert(img, masks_all[:1], size=size, steps=1)  # warm-up: allocator, pos-embed resample
        for n in args.masks:
            masks = masks_all[:n]
            engine.cache.clear()
            cold, t_cold, mem_cold = timed(lambda: engine.invert(img, masks, size=size, steps=args.steps))
            warm, t_warm, mem_warm = timed(lambda: engine.invert(img, masks, size=size, steps=args.steps))
            assert warm.image_hit and not cold.image_hit
            row = {"size": size, "N": n, "K": args.steps, "cold_s": t_cold, "warm_s": t_warm,
                   "cold_peak_mib": mem_cold.delta_mib, "warm_peak_mib": mem_warm.delta_mib,
                   "forward_s": cold.timings["forward_s"], "chunk": engine.masks_per_chunk(size)}
            macs = decomposed_macs_per_mask_step(n_tok, d, m) * n * (args.steps + 1)  # +1: final-loss map
            row["warm_gmacs"] = macs / t_warm / 1e9
            if n <= args.autograd_max_n:
                ref, t_ref, mem_ref = timed(
                    lambda: engine.invert(img, masks, size=size, steps=args.steps, method="autograd"))
                cos = torch.nn.functional.cosine_similarity(ref.lets, warm.lets).min().item()
                row.update(autograd_s=t_ref, autograd_peak_mib=mem_ref.delta_mib, speedup_warm=t_ref / t_warm,
                           speedup_cold=t_ref / t_cold, min_cos_vs_autograd=cos)
            rows.append(row)
            print(json.dumps(row), flush=True)

    cpu = platform.processor() or platform.machine()
    dev = str(clip.device) if clip.device.type != "cpu" else f"CPU ({os.cpu_count()} threads, {cpu})"
    lines = [
        f"# MaskInversion inversion benchmark — {args.model} ({args.pretrained or 'random init'}), K={args.steps}",
        "",
        f"Device: {dev}; torch {torch.__version__}; measured fp32 matmul rate: {rate:.1f} GMAC/s.",
        "cold = ViT forward + inversion (empty cache); warm = cached image, inversion only; autograd = reference "
        "(image repeated per mask, ViT re-run and second-order autograd every step). "
        "Peak = RSS growth during the call.",
        "",
        "| size | N | cold s | warm s | autograd s | warm speed-up | cold speed-up | min cos(LET) vs autograd "
        "| warm GMAC/s | peak MiB cold / warm / autograd |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def fmt(value, spec: str, suffix: str = "") -> str:
        return "—" if value is None else f"{value:{spec}}{suffix}"

    for r in rows:
        lines.append(
            f"| {r['size']} | {r['N']} | {r['cold_s']:.2f} | {r['warm_s']:.2f} | {fmt(r.get('autograd_s'), '.2f')} | "
            f"{fmt(r.get('speedup_warm'), '.1f', '×')} | {fmt(r.get('speedup_cold'), '.1f', '×')} | "
            f"{fmt(r.get('min_cos_vs_autograd'), '.6f')} | {r['warm_gmacs']:.1f} | "
            f"{r['cold_peak_mib']:.0f} / {r['warm_peak_mib']:.0f} / {fmt(r.get('autograd_peak_mib'), '.0f')} |")
    lines += ["", "MACs per mask-step (decomposed, map + backward to the LET): "
              + ", ".join(f"S={s}: {decomposed_macs_per_mask_step((s // clip.patch_size) ** 2 + 1, d, m) / 1e9:.2f} G"
                          for s in args.sizes), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"device": dev, "matmul_gmacs": rate, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
