"""Benchmark: this engine against the public MaskInversion package, same weights, image and masks, one run.

Official = PyPI ``maskinversion-torch`` 1.1 over ``legrad-torch`` 1.1 on ``open_clip_torch`` <= 2.23, in its own
virtualenv (``scripts/official_env.sh`` creates it idempotently), run in a subprocess of that venv. Ours = the
decomposed engine (``final_loss=False``, as the job functions call it). Both get the ViT-B/16 architecture with
the same random weights (fixed seed; the state dict is passed across), the same preprocessed pixels and the same
SxS mask targets, K AdamW steps (lr 0.1, wd 0, alpha 0). The LETs are compared by cosine.

Also measures the machine's fp32 GEMM rate on the step's big shapes and reports the achieved rate of the warm
step against the FLOP floor ``2·n·m·d + 2·n²·d`` MAC per mask-step. Records ``uptime`` load averages: the
machine may be shared. Writes ``benchmarks/results/vs_official.md`` and ``.json``.

    python benchmarks/bench_vs_official.py                      # 224 and 448, N = 1, 10 (+100 where allowed)
    python benchmarks/bench_vs_official.py --sizes 224 --masks 1 10 --official-runs 1 --rounds 1
    python benchmarks/bench_vs_official.py --siglip --sizes 224 --masks 10   # attention-pooled tower

``--siglip``: ViT-B-16-SigLIP (random init), the attention-pooled map of :mod:`worker.engine.attn_pool`. The
package is called once per mask (its batched SigLIP call gives every mask the same map, hence the same LET; its
time and LETs are reported beside), with the same empty-prompt vector on both sides. Writes
``benchmarks/results/vs_official_siglip.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.bench_inversion import random_masks
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import clip_from_model, load_clip
from worker.engine.preprocess import mask_to_target

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results")

# Run with the official venv's python: argv = [spec.json]; reads tensors, writes LETs and times.
OFFICIAL_RUNNER = r'''
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, open_clip
from maskinversion import MaskInversion
spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
state = torch.load(spec["state_dict"])
out = {"rows": [], "versions": {"open_clip": open_clip.__version__ if hasattr(open_clip, "__version__") else "",
                                "torch": torch.__version__}}
for job in spec["jobs"]:
    model = open_clip.create_model(spec["model"], pretrained=None)
    model.load_state_dict(state)  # fresh per size: the package resamples (mutates) the position embedding
    model.eval()
    mi = MaskInversion(model, layer_index=-1, alpha=0.0, lr=spec["lr"], iterations=spec["steps"], wd=0.0)
    data = torch.load(job["inputs"])
    pixels, masks = data["pixels"], data["masks"]
    mi.compute_maskinversion(pixels, masks[:1], iterations=1)  # warm-up: position embedding, allocator
    for n in job["masks"]:
        times = []
        for _ in range(job["runs"][str(n)]):
            t0 = time.perf_counter()
            lets = mi.compute_maskinversion(pixels, masks[:n], iterations=spec["steps"])
            times.append(time.perf_counter() - t0)
        path = job["inputs"] + f".lets{n}.pt"
        torch.save(lets.detach(), path)
        out["rows"].append({"size": job["size"], "N": n, "times": times, "lets": path})
        print(json.dumps(out["rows"][-1]), flush=True)
json.dump(out, open(spec["out"], "w"))
'''


def uptime_load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def gemm_rates(n: int, d: int, m: int, heads: int, repeat: int = 5) -> dict[str, float]:
    """Measured fp32 GMAC/s of the step's large products at n tokens (best of ``repeat``)."""
    from worker.engine.cpu_gemm import PackedMatrix, linear

    dh = d // heads
    packed = PackedMatrix(torch.randn(m, d))  # the step's oneDNN path (MASKINV_CPU_GEMM=onednn)
    x_heads, v_rows, v_cols = torch.randn(n, heads, dh), torch.randn(heads, n - 1, dh), torch.randn(heads, dh, n - 1)
    pattern, col = torch.randn(heads, n, n - 1), torch.rand(n - 1)
    shapes = {
        "mlp [n,m]x[m,d]": (lambda a=torch.randn(n, m), b=torch.randn(m, d): a @ b, n * m * d),
        "mlp bwd [n,d]x[d,m]": (lambda a=torch.randn(n, d), b=torch.randn(d, m): a @ b, n * m * d),
        "mlp oneDNN": (lambda a=torch.randn(n, m): packed.mm(a), n * m * d),
        "mlp bwd oneDNN": (lambda a=torch.randn(n, d): packed.mm(a, transpose=True), n * m * d),
        "attn [H,n,dh]x[H,dh,n-1]": (lambda a=torch.randn(heads, n, dh), b=torch.randn(heads, dh, n - 1):
                                     torch.bmm(a, b), heads * n * (n - 1) * dh),
        "attn bwd [H,n,n-1]x[H,n-1,dh]": (lambda a=torch.randn(heads, n, n - 1), b=torch.randn(heads, n - 1, dh):
                                          torch.bmm(a, b), heads * n * (n - 1) * dh),
        # what the step runs from worker.engine.cpu_gemm.ONEDNN_MIN_COLUMNS patch columns on: one linear per head
        "attn oneDNN per head": (lambda: [linear(x_heads[:, h], v_rows[h]) for h in range(heads)],
                                 heads * n * (n - 1) * dh),
        "attn bwd oneDNN per head": (lambda: [linear(pattern[h], v_cols[h] * col) for h in range(heads)],
                                     heads * n * (n - 1) * dh),
    }
    out = {}
    for name, (fn, macs) in shapes.items():
        fn()
        best = min(_time(fn) for _ in range(repeat))
        out[name] = macs / best / 1e9
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def floor_macs(n: int, d: int, m: int) -> float:
    """MACs per mask-step at the floor: the MLP-side GEMM and ∂s/∂A, forward and backward."""
    return 2.0 * n * m * d + 2.0 * n * n * d


SIGLIP_RUNNER = REPO / "tests" / "worker" / "engine" / "official_siglip.py"


def siglip_main(args: argparse.Namespace, venv_python: Path) -> None:
    """The attention-pooled rows: per size and mask count, the package once per mask (and its batched call) against
    our engine cold and warm, best of ``--runs``; LETs compared by cosine."""
    import open_clip

    threads = torch.get_num_threads()
    load_start = uptime_load()
    model_name = "ViT-B-16-SigLIP" if args.model == "ViT-B-16" else args.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = open_clip.create_model(model_name, pretrained=None)
    clip = clip_from_model(model, model_name, None, f"{model_name}/random-seed{args.seed}")
    empty = torch.randn(clip.embed_dim, generator=torch.Generator().manual_seed(args.seed))
    engine = MaskInversionEngine(clip, empty_prompt_embedding=empty)
    rng = np.random.default_rng(args.seed)
    # colour blocks: on fine noise the random-init pool's map is 0 at the image embedding and no LET moves
    blocks = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    img = blocks.resize((640, 480), Image.Resampling.NEAREST)
    masks_all = random_masks(max(args.masks), 480, 640, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="maskinv-vs-official-siglip-"))
    rows = []
    for size in args.sizes:
        engine.invert(img, masks_all[:1], size=size, steps=1)  # warm-up: pos-embed resample, allocator
        for n in args.masks:
            masks = masks_all[:n]
            targets = torch.from_numpy(np.stack([mask_to_target(mk, size) for mk in masks])).float()
            torch.save({"visual": model.visual.state_dict(), "pixels": engine._pixels(img, size).cpu(),
                        "masks": targets, "empty": empty, "probes": torch.zeros(0, clip.embed_dim)},
                       tmp / "inputs.pt")
            spec = {"threads": threads, "inputs": str(tmp / "inputs.pt"), "model": model_name, "steps": args.steps,
                    "out": str(tmp / "out.pt"), "batched": True}
            (tmp / "spec.json").write_text(json.dumps(spec))
            subprocess.run([str(venv_python), str(SIGLIP_RUNNER), str(tmp / "spec.json")], check=True,
                           capture_output=True)
            official = torch.load(tmp / "out.pt")
            cold_t, warm_t = [], []
            for _ in range(args.runs):
                engine.cache.clear()
                t = time.perf_counter()
                engine.invert(img, masks, size=size, steps=args.steps, final_loss=False)
                cold_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                warm = engine.invert(img, masks, size=size, steps=args.steps, final_loss=False)
                warm_t.append(time.perf_counter() - t)
            batched = official.get("batched_lets")
            row = {"size": size, "N": n, "K": args.steps, "official_per_mask_s": float(official["times"].sum()),
                   "official_batched_s": official.get("batched_time"), "cold_s": min(cold_t), "warm_s": min(warm_t),
                   "cold_runs": cold_t, "warm_runs": warm_t,
                   "min_cos": F.cosine_similarity(official["lets"], warm.lets).min().item(),
                   "mean_cos_to_image": F.cosine_similarity(warm.lets, warm.global_embedding[None]).mean().item(),
                   "batched_min_cos": None if batched is None else
                   F.cosine_similarity(batched, official["lets"]).min().item()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    load_end = uptime_load()
    lines = [f"# This engine vs the official MaskInversion package — {model_name} (random init, seed {args.seed}), "
             f"K={args.steps}", "",
             f"CPU, {threads} threads, torch {torch.__version__} both sides; official = maskinversion-torch 1.1 + "
             "legrad-torch 1.1 + open_clip 2.23.0 in .venv-official, called once per mask (its batched SigLIP call "
             "gives every mask the same map); same weights, pixels, mask targets and empty-prompt vector. "
             f"Load average (1/5/15 min) at start: {load_start}; at end: {load_end}. Ours: best of {args.runs}; "
             "official: one run.",
             "cold = image-state cache empty (tower forward + K steps); warm = cached image (K steps). "
             "min cos(LET): ours against the package's per-mask LETs; cos(LET, image): how far the LETs moved from "
             "the image embedding (mean); batched min cos: the package's one call over all masks against its "
             "per-mask LETs.", "",
             "| size | N | official per mask, total s | official batched s | ours cold s | ours warm s | warm × | "
             "cold × | min cos(LET) | cos(LET, image) | batched min cos |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        off = r["official_per_mask_s"]
        lines.append(f"| {r['size']} | {r['N']} | {off:.2f} | {r['official_batched_s'] or float('nan'):.2f} | "
                     f"{r['cold_s']:.2f} | {r['warm_s']:.3f} | {off / r['warm_s']:.0f}× | {off / r['cold_s']:.1f}× | "
                     f"{r['min_cos']:.6f} | {r['mean_cos_to_image']:.3f} | "
                     f"{r['batched_min_cos'] or float('nan'):.3f} |")
    out = Path(args.out if args.out != str(RESULTS / "vs_official.md") else RESULTS / "vs_official_siglip.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"load_start": load_start, "load_end": load_end,
                                                    "threads": threads, "rows": rows}, indent=1))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--masks", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="best of this many runs of ours (cold and warm)")
    ap.add_argument("--official-runs", type=int, default=2)
    ap.add_argument("--official-max-n", type=str, default="224:100,448:10",
                    help="largest N run with the official package per size (it is slow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds per size, alternating which side runs first (best of all rounds per side) [2]")
    ap.add_argument("--out", default=str(RESULTS / "vs_official.md"))
    ap.add_argument("--siglip", action="store_true", help="the attention-pooled tower (ViT-B-16-SigLIP) instead")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    max_n = {int(k): int(v) for k, v in (p.split(":") for p in args.official_max_n.split(","))}

    subprocess.run(["bash", str(REPO / "scripts" / "official_env.sh")], check=True)
    venv_python = Path(os.environ.get("OFFICIAL_VENV", REPO / ".venv-official")) / "bin" / "python"
    if args.siglip:
        return siglip_main(args, venv_python)

    load_start = uptime_load()
    clip = load_clip(args.model, "none", "cpu", seed=args.seed)
    engine = MaskInversionEngine(clip)
    rng = np.random.default_rng(args.seed)
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    masks_all = random_masks(max(args.masks), 480, 640, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="maskinv-vs-official-"))
    torch.save(clip.model.state_dict(), tmp / "state.pt")
    view_n = {s: (s // clip.patch_size) ** 2 + 1 for s in args.sizes}
    from worker.engine import vit
    view = vit.last_block(clip.visual)
    d, m, heads = view.width, view.mlp_width, view.heads
    rates = {s: gemm_rates(view_n[s], d, m, heads) for s in args.sizes}
    (tmp / "runner.py").write_text(OFFICIAL_RUNNER)

    def run_official(size: int, inputs: Path, ns: list[int], tag: str) -> dict[int, dict]:
        """One pass of the official package over ``ns`` masks at ``size`` (its own venv, a fresh process)."""
        job = {"size": size, "inputs": str(inputs), "masks": ns,
               "runs": {str(n): (1 if n >= 100 else args.official_runs) for n in ns}}
        spec = {"model": args.model, "state_dict": str(tmp / "state.pt"), "threads": threads, "steps": args.steps,
                "lr": 0.1, "jobs": [job], "out": str(tmp / f"official{tag}.json")}
        (tmp / f"spec{tag}.json").write_text(json.dumps(spec))
        subprocess.run([str(venv_python), str(tmp / "runner.py"), str(tmp / f"spec{tag}.json")], check=True)
        return {r["N"]: r for r in json.loads((tmp / f"official{tag}.json").read_text())["rows"]}

    def run_ours(size: int) -> dict[int, dict]:
        """One pass of this engine: cold and warm, ``--runs`` times (2 at N >= 100), per mask count."""
        engine.invert(img, masks_all[:1], size=size, steps=1)  # warm-up: pos-embed resample, allocator
        out = {}
        for n in args.masks:
            masks = masks_all[:n]
            cold_t, warm_t = [], []
            for _ in range(2 if n >= 100 else args.runs):
                engine.cache.clear()
                t = time.perf_counter()
                cold = engine.invert(img, masks, size=size, steps=args.steps, final_loss=False)
                cold_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                warm = engine.invert(img, masks, size=size, steps=args.steps, final_loss=False)
                warm_t.append(time.perf_counter() - t)
            assert warm.image_hit and not cold.image_hit
            out[n] = {"cold": cold_t, "warm": warm_t, "lets": warm.lets}
        return out

    rows = []
    for size in args.sizes:
        targets = torch.from_numpy(np.stack([mask_to_target(mk, size) for mk in masks_all])).float()
        inputs = tmp / f"inputs{size}.pt"
        torch.save({"pixels": engine._pixels(img, size).cpu(), "masks": targets}, inputs)
        ns = [n for n in args.masks if n <= max_n.get(size, max(args.masks))]
        official: dict[int, list] = {n: [] for n in ns}
        ours: dict[int, dict] = {n: {"cold": [], "warm": []} for n in args.masks}
        official_lets: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        for r in range(args.rounds):  # the two sides alternate, so a slow minute of a shared VM hits both
            for side in (("official", "ours") if r % 2 == 0 else ("ours", "official")):
                if side == "official" and ns:
                    for n, row in run_official(size, inputs, ns, f"{size}r{r}").items():
                        official[n] += row["times"]
                        official_lets[n] = torch.load(row["lets"])
                elif side == "ours":
                    for n, o in run_ours(size).items():
                        ours[n]["cold"] += o["cold"]
                        ours[n]["warm"] += o["warm"]
                        ours[n]["lets"] = o["lets"]
        print(f"size {size}: {args.rounds} rounds in {time.perf_counter() - t0:.0f}s", flush=True)
        for n in args.masks:
            cold_t, warm_t = ours[n]["cold"], ours[n]["warm"]
            macs = floor_macs(view_n[size], d, m) * n * args.steps
            row = {"size": size, "N": n, "K": args.steps, "cold_s": min(cold_t), "warm_s": min(warm_t),
                   "cold_runs": cold_t, "warm_runs": warm_t, "warm_gmacs_at_floor": macs / min(warm_t) / 1e9,
                   "warm_s_per_mask": min(warm_t) / n, "chunk": engine.masks_per_chunk(size)}
            if official.get(n):
                row.update(official_s=min(official[n]), official_runs=official[n],
                           warm_ratio=min(official[n]) / min(warm_t), cold_ratio=min(official[n]) / min(cold_t),
                           min_cos=F.cosine_similarity(official_lets[n], ours[n]["lets"]).min().item())
            rows.append(row)
            print(json.dumps(row), flush=True)
    load_end = uptime_load()

    def fmt(v, spec: str, suffix: str = "") -> str:
        return "—" if v is None else f"{v:{spec}}{suffix}"

    lines = [f"# This engine vs the official MaskInversion package — {args.model} (random init, seed {args.seed}), "
             f"K={args.steps}", "",
             f"CPU, {threads} threads, torch {torch.__version__} both sides; official = maskinversion-torch 1.1 + "
             "legrad-torch 1.1 + open_clip 2.23.0 in .venv-official; same weights, pixels and mask targets. "
             f"Load average (1/5/15 min) at start: {load_start}; at end: {load_end}. {args.rounds} rounds per "
             "size, alternating which side runs first (official, ours; then ours, official), so that a slow "
             f"minute of the shared VM hits both; per round {args.runs} runs of ours (2 at N=100) and "
             f"{args.official_runs} of the official (1 at N=100); best of all rounds per side. Our engine's CPU "
             f"GEMMs: {engine.cpu_gemm} (MASKINV_CPU_GEMM=auto on a CPU with "
             f"{torch.backends.cpu.get_cpu_capability()}).",
             "cold = image-state cache empty (ViT forward + K steps); warm = cached image (K steps). "
             "The official package runs the ViT on N copies of the image every step, so it has no warm case.", "",
             "| size | N | official s | ours cold s | ours warm s | warm ×  | cold × | min cos(LET) | warm s/mask "
             "| warm GMAC/s at floor |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['N']} | {fmt(r.get('official_s'), '.2f')} | {r['cold_s']:.2f} | "
                     f"{r['warm_s']:.2f} | {fmt(r.get('warm_ratio'), '.1f', '×')} | "
                     f"{fmt(r.get('cold_ratio'), '.1f', '×')} | "
                     f"{fmt(r.get('min_cos'), '.6f')} | {r['warm_s_per_mask']:.3f} | {r['warm_gmacs_at_floor']:.1f} |")
    lines += ["", "Measured fp32 GEMM rate on the step's shapes (GMAC/s, best of 5, same run; torch's BLAS, and "
              "oneDNN as the step runs them with MASKINV_CPU_GEMM=onednn: the MLP matrix packed, the attention "
              "products one linear per head, which the step uses from 320 patch columns on, i.e. at 448 and not "
              "at 224):", "",
              "| size | n | " + " | ".join(rates[args.sizes[0]]) + " |",
              "|---:|---:|" + "---:|" * len(rates[args.sizes[0]])]
    for s in args.sizes:
        lines.append(f"| {s} | {view_n[s]} | " + " | ".join(f"{v:.1f}" for v in rates[s].values()) + " |")
    lines += ["", "FLOP floor per mask-step (2·n·m·d + 2·n²·d MAC): "
              + ", ".join(f"S={s}: {floor_macs(view_n[s], d, m) / 1e9:.2f} GMAC" for s in args.sizes), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"load_start": load_start, "load_end": load_end,
                                                    "threads": threads, "rounds": args.rounds, "gemm_gmacs": rates,
                                                    "rows": rows},
                                                   indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
