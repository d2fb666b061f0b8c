"""Worker memory under a stream of new label sets: bounded text caches vs unbounded ones.

Each "request" scores one region against ``--labels`` labels never seen before (one template), as a client
sending a fresh vocabulary every time would. ``bounded`` uses the worker's defaults
(``MASKINV_PROTOTYPE_CACHE_ENTRIES``/``_MB`` = 256 / 64 MiB, tokenizer memo 50,000 words / 4 Mi characters) or
the bounds given; ``unbounded`` sets every bound out of reach, which is how the caches behaved before the fix.
Each mode runs in its own process; RSS is read from /proc after every request.

    nice .venv/bin/python benchmarks/label_cache_memory.py                    # 40 requests x 1000 labels
    .venv/bin/python benchmarks/label_cache_memory.py --requests 10 --labels 200  # quick check

Output: benchmarks/results/label_cache_memory.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def letters(n: int) -> str:
    """A distinct all-letter word per ``n`` (the tokenizer splits digits off, so numbered labels would repeat
    the same few words)."""
    out = "qz"
    while True:
        n, k = divmod(n, 26)
        out += chr(97 + k)
        if not n:
            return out


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_mode(mode: str, requests: int, labels: int, max_entries: int, max_mb: int) -> dict:
    import torch

    from worker.text.labels import LabelScorer
    from worker.engine.models import load_clip

    torch.set_num_threads(1)
    clip = load_clip("maskinv-test-tiny", "none", "cpu")
    if mode == "bounded":
        scorer = LabelScorer(clip, max_entries=max_entries, max_bytes=max_mb << 20)
    else:
        scorer = LabelScorer(clip, max_entries=10**9, max_bytes=1 << 50)
        clip.tokenizer.cache.max_entries, clip.tokenizer.cache.max_chars = 10**12, 10**15
    emb = torch.randn(1, clip.embed_dim)
    scorer.score(emb, ["warm", "up"], ["a {}."])
    rows = []
    for r in range(requests + 1):
        if r:
            scorer.score(emb, [letters(r * labels + i) for i in range(labels)], ["a {}."])
        rows.append({"request": r, "rss_mib": round(rss_mib(), 1), "prototype_entries": len(scorer.cache),
                     "prototype_bytes": scorer.cache.bytes, "tokenizer_words": clip.tokenizer.cache.unpinned,
                     "tokenizer_chars": clip.tokenizer.cache.chars})
    return {"mode": mode, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--max-entries", type=int, default=256, help="MASKINV_PROTOTYPE_CACHE_ENTRIES for 'bounded'")
    ap.add_argument("--max-mb", type=int, default=64, help="MASKINV_PROTOTYPE_CACHE_MB for 'bounded'")
    ap.add_argument("--mode", choices=("bounded", "unbounded"), help=argparse.SUPPRESS)  # child process
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a.mode, a.requests, a.labels, a.max_entries, a.max_mb)))
        return
    results = []
    for mode in ("bounded", "unbounded"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--requests", str(a.requests), "--labels",
                              str(a.labels), "--max-entries", str(a.max_entries), "--max-mb", str(a.max_mb)],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                             check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "label_cache_memory.json").write_text(json.dumps(
        {"requests": a.requests, "labels_per_request": a.labels, "max_entries": a.max_entries, "max_mb": a.max_mb,
         "results": results}, indent=1))
    step = max(1, a.requests // 4)
    lines = [f"# Worker memory under new label sets (tiny model, {a.requests} requests x {a.labels} new labels)",
             "", f"`python benchmarks/label_cache_memory.py --requests {a.requests} --labels {a.labels}` "
             f"(bounded: {a.max_entries} label sets / {a.max_mb} MiB of prototypes, tokenizer memo 50,000 words / "
             "4 Mi characters; unbounded: every bound out of reach). RSS of the process, MiB.",
             "", "| mode | request | RSS | prototype entries | prototype bytes | tokenizer words | tokenizer chars |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for row in res["rows"]:
            if row["request"] % step == 0 or row["request"] == a.requests:
                lines.append(f"| {res['mode']} | {row['request']} | {row['rss_mib']} | {row['prototype_entries']} | "
                             f"{row['prototype_bytes']} | {row['tokenizer_words']} | {row['tokenizer_chars']} |")
    growth = {res["mode"]: res["rows"][-1]["rss_mib"] - res["rows"][step]["rss_mib"] for res in results}
    lines += ["", "RSS growth from request " + str(step) + " to the end: " +
              ", ".join(f"{m} {g:+.1f} MiB" for m, g in growth.items()) + "."]
    (OUT / "label_cache_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
