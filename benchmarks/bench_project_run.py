"""Benchmark: regions/second of a project run (``maskinv-annotate``) with 1 and 2 queue workers against the
synchronous path (one batch ``POST /predict`` with every task, what *Retrieve predictions* sends) on the same
tasks, in queue mode on the real Redis, against a real Label Studio.

For each model (the tiny test model at 64 px; ViT-B/16 with random weights at 224 px) and each measurement it
starts fresh worker processes (empty image-state caches) on a fresh queue and key prefix (empty result cache),
creates a fresh Label Studio project with the same T tasks (uploaded 320x240 PNGs, R annotated rectangles
each), and times

* ``sync``: one ``/predict`` with all T tasks through ``maskinv-backend`` (client wall time);
* ``run``: ``maskinv-annotate`` on the project (the run's own time, from its summary: listing, image downloads,
  jobs, the re-check and the write of each prediction; process start-up and model-version lookup excluded),
  with its default of twice as many tasks in flight as there are workers.

The machine's 1-minute load average is recorded before and after each measurement (other people's work on
the same cores shows up there). Writes ``benchmarks/results/project_run.md`` and ``.json``.

    python benchmarks/bench_project_run.py                # tiny (T=24) and ViT-B/16 @224 (T=8), ~6 min
    python benchmarks/bench_project_run.py --only tiny
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))
sys.path.insert(0, str(REPO_ROOT))

from ls_harness import BackendServer, LabelStudioClient, LabelStudioServer, WorkerProcess  # noqa: E402

RESULTS = Path(__file__).with_name("results")
LABEL_CONFIG = (REPO_ROOT / "label_config" / "rectangle.xml").read_text()
IMAGE_W, IMAGE_H = 320, 240
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Model:
    key: str
    model: str
    size: int
    tasks: int
    regions: int = 3


MODELS = [Model("tiny", "maskinv-test-tiny", 64, tasks=24), Model("b16-224", "ViT-B-16", 224, tasks=8)]
#: (path, queue workers, torch threads per worker: None = torch's default, one per core)
MEASUREMENTS = [("sync", 1, None), ("sync", 2, None), ("run", 1, None), ("run", 2, None), ("sync", 2, 1), ("run", 2, 1)]


def scene_png(rng: np.random.Generator) -> bytes:
    base = rng.integers(60, 200, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = int(rng.integers(0, IMAGE_W - 60)), int(rng.integers(0, IMAGE_H - 60))
        draw.rectangle([x, y, x + 50, y + 40], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def rect(rng: np.random.Generator) -> dict:
    x, y = float(rng.uniform(0, 60)), float(rng.uniform(0, 60))
    return {"id": uuid.uuid4().hex[:10], "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": IMAGE_W, "original_height": IMAGE_H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": float(rng.uniform(10, 35)), "height": float(rng.uniform(10, 35)),
                      "rotation": 0, "rectanglelabels": []}}


def make_project(ls: LabelStudioClient, images: list[bytes], regions: list[list[dict]]) -> int:
    pid = ls.create_project(f"bench {uuid.uuid4().hex[:6]}", LABEL_CONFIG)["id"]
    tasks = ls.upload_images(pid, [(f"b{k}.png", im) for k, im in enumerate(images)])
    for t, regs in zip(tasks, regions):
        ls.create_annotation(t["id"], regs)
    return pid


def start_workers(n: int, env: dict, logs: Path) -> list[WorkerProcess]:
    from redis import Redis

    from worker.queue_worker import WorkerRegistry

    workers = [WorkerProcess(logs / f"worker{k}.log", env=env).start() for k in range(n)]
    registry = WorkerRegistry(Redis.from_url(REDIS_URL), env["MASKINV_QUEUE"], prefix=env["MASKINV_REDIS_PREFIX"])
    deadline = time.monotonic() + 600
    while len(registry.live_workers()) < n:
        for w in workers:
            if not w.process.alive():
                raise RuntimeError(f"worker died: {w.process.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not register")
        time.sleep(0.5)
    return workers


def cleanup(ns: str) -> None:
    """Remove the run's Redis keys (``benchmarks.bench_service.delete_namespace``)."""
    from benchmarks.bench_service import delete_namespace

    delete_namespace(REDIS_URL, ns)


def measure(ls_server: LabelStudioServer, ls: LabelStudioClient, token: str, m: Model, path: str, n_workers: int,
            threads: int | None, images: list[bytes], regions: list[list[dict]], logs: Path) -> dict:
    ns = f"maskinv-bench-run-{uuid.uuid4().hex[:8]}"
    env = {"MASKINV_MODEL": m.model, "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu",
           "MASKINV_SIZE": str(m.size), "REDIS_URL": REDIS_URL, "MASKINV_QUEUE": ns, "MASKINV_REDIS_PREFIX": ns,
           "MASKINV_BATCH_TIMEOUT": "3600", "MASKINV_JOB_TIMEOUT": "3600", "MASKINV_MAX_TASKS": "1000",
           "MASKINV_LOG_LEVEL": "WARNING", "MASKINV_BACKGROUND_RUNS": "0"}
    pid = make_project(ls, images, regions)
    wenv = dict(env, OMP_NUM_THREADS=str(threads)) if threads else env
    workers = start_workers(n_workers, wenv, logs)
    n_regions = sum(len(r) for r in regions)
    load_before = os.getloadavg()[0]
    try:
        if path == "sync":
            backend = BackendServer(logs / f"backend-{ns}.log", env=dict(
                env, LABEL_STUDIO_URL=ls_server.url, LABEL_STUDIO_API_KEY=token)).start()
            try:
                tasks = ls.tasks(pid)
                t0 = time.perf_counter()
                resp = requests.post(f"{backend.url}/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG},
                                     timeout=3600)
                seconds = time.perf_counter() - t0
                resp.raise_for_status()
                labelled = sum(p.get("maskinv", {}).get("labelled", 0) for p in resp.json()["results"]
                               if isinstance(p, dict))
            finally:
                backend.stop()
        else:
            summary = logs / f"summary-{ns}.json"
            full = {**os.environ, **env, "MASKINV_RUN_STATE_DIR": str(logs / "state")}
            full.pop("LABEL_STUDIO_URL", None)
            proc = subprocess.run([sys.executable, "-m", "backend.cli.annotate", "--url", ls_server.url, "--token",
                                   token, "--project", str(pid), "--summary-json", str(summary), "--no-progress"],
                                  env=full, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
            if not summary.exists():
                raise RuntimeError(f"maskinv-annotate failed: {proc.stderr[-3000:]}")
            s = json.loads(summary.read_text())
            seconds, labelled = s["seconds"], s["regions"]
    finally:
        load_after = os.getloadavg()[0]
        for w in workers:
            w.stop()
        cleanup(ns)
    if labelled != n_regions:
        raise RuntimeError(f"{path} with {n_workers} worker(s) labelled {labelled} of {n_regions} regions")
    return {"model": m.key, "size": m.size, "path": path, "workers": n_workers,
            "threads_per_worker": threads or os.cpu_count(), "tasks": len(images),
            "regions": n_regions, "seconds": round(seconds, 2), "regions_per_s": round(n_regions / seconds, 3),
            "load_before": round(load_before, 2), "load_after": round(load_after, 2)}


def write_results(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "project_run.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Project runs: regions/s of maskinv-annotate vs one synchronous /predict", "",
             f"{meta['machine']}; queue mode on the real Redis, fresh workers (empty caches) per row; "
             "T tasks x 3 annotated rectangles on 320x240 PNGs uploaded to Label Studio 1.23. `sync`: one batch "
             "`/predict` with all T tasks (what *Retrieve predictions* sends), client wall time. `run`: "
             "`maskinv-annotate` (listing, downloads, jobs, re-check and write of each prediction through the "
             "Label Studio API), time from its summary, 2x workers tasks in flight. Load: 1-minute load average "
             "before / after the row (the 2 cores are shared with other work).", "",
             "| model | size | path | workers | torch threads/worker | tasks | regions | seconds | regions/s "
             "| vs sync, 1 worker | load before/after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["model"]: r["regions_per_s"] for r in rows if r["path"] == "sync" and r["workers"] == 1}
    for r in rows:
        ratio = r["regions_per_s"] / base[r["model"]] if base.get(r["model"]) else float("nan")
        threads = r.get('threads_per_worker', 2)
        lines.append(f"| {r['model']} | {r['size']} | {r['path']} | {r['workers']} | {threads} | "
                     f"{r['tasks']} | {r['regions']} | "
                     f"{r['seconds']:.2f} | {r['regions_per_s']:.2f} | {ratio:.2f}x | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", meta.get("notes", "")]
    (RESULTS / "project_run.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=[m.key for m in MODELS])
    p.add_argument("--notes", default="")
    p.add_argument("--rows", choices=["all", "threads1"], default="all",
                   help="threads1: only the 2-worker rows with one torch thread per worker (merged into the results)")
    args = p.parse_args()
    models = [m for m in MODELS if args.only in (None, m.key)]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="maskinv-bench-run-") as tmp:
        tmp_path = Path(tmp)
        ls_server = LabelStudioServer(tmp_path / "ls").start()
        try:
            token = ls_server.personal_access_token()
            ls = LabelStudioClient(ls_server.url, token)
            for m in models:
                rng = np.random.default_rng(0)
                images = [scene_png(rng) for _ in range(m.tasks)]
                regions = [[rect(rng) for _ in range(m.regions)] for _ in range(m.tasks)]
                for path, n, threads in MEASUREMENTS:
                    if args.rows == "threads1" and threads != 1:
                        continue
                    row = measure(ls_server, ls, token, m, path, n, threads, images, regions, tmp_path)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            ls_server.stop()
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "notes": args.notes}
    old = RESULTS / "project_run.json"
    if (args.only or args.rows != "all") and old.exists():  # keep the rows of earlier runs not measured now
        ident = lambda r: (r["model"], r["path"], r["workers"], r.get("threads_per_worker", os.cpu_count()))  # noqa: E731
        new = {ident(r) for r in rows}
        rows = [r for r in json.loads(old.read_text())["rows"] if ident(r) not in new] + rows
        order = [m.key for m in MODELS]
        rows.sort(key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    write_results(rows, meta)
    print((RESULTS / "project_run.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
