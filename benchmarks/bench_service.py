"""Benchmark: the ML backend's HTTP API as Label Studio calls it (POST /predict), queue mode, one worker.

For each configuration (model, MaskInversion input size) it starts a real Redis-backed deployment on this
machine: one ``python -m worker`` process and ``maskinv-backend`` with ``REDIS_URL`` set (fresh queue name and
key prefix, removed afterwards), plus a small HTTP server that serves the task images (640x480 PNGs). Then:

* interactive, cold image — one task, one region in ``params.context.result`` (what Label Studio sends while
  an annotator draws), on an image the service has never seen: image download + ViT forward + inversion;
* interactive, warm image — a new region on the image of the previous request: the worker's image-state
  cache and the backend's image cache hit, only the inversion runs;
* batch — one /predict with T tasks whose annotations hold R regions each (what the Data Manager's
  "Retrieve Predictions" sends for T selected tasks); regions/second over the whole request.

Every region is new (no result-cache hits). Latencies are client-side wall times of the HTTP request. A first
request after start-up (text prototypes, caption phrase banks) is excluded and reported separately.
Writes ``benchmarks/results/service.md`` (and ``.json``).

    nice python benchmarks/bench_service.py                 # full run: tiny @64, ViT-B/16 @224 and @448
    python benchmarks/bench_service.py --only tiny          # the tiny model only (~1 min)
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
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

from ls_harness import BackendServer, WorkerProcess  # noqa: E402

RESULTS = Path(__file__).with_name("results")
LABEL_CONFIG = REPO_ROOT / "label_config" / "rectangle.xml"
IMAGE_W, IMAGE_H = 640, 480


@dataclass(frozen=True)
class Config:
    """One benchmarked deployment."""

    key: str
    model: str
    pretrained: str
    size: int
    interactive_n: int
    batch_tasks: int  # 0: no batch run
    batch_regions: int = 5


CONFIGS = [
    # the tiny model at 64 px (8x8 tokens): compute is negligible, so this row is the service's own overhead
    Config("tiny", "maskinv-test-tiny", "none", 64, interactive_n=10, batch_tasks=50),
    Config("b16-224", "ViT-B-16", "none", 224, interactive_n=5, batch_tasks=50),
    Config("b16-448", "ViT-B-16", "none", 448, interactive_n=3, batch_tasks=0),
]


# ---------------------------------------------------------------------------------------------------------------
# images and requests
# ---------------------------------------------------------------------------------------------------------------
class ImageServer:
    """Serves in-memory PNGs at ``/data/upload/1/<name>.png`` on 127.0.0.1 (stands in for Label Studio).

    The backend gets its address as ``LABEL_STUDIO_URL`` and the tasks carry ``/data/upload/...`` paths, as
    Label Studio's tasks do for uploaded images; requests must carry ``Authorization: Token <API_KEY>``.
    """

    API_KEY = "maskinv-bench-token"

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}
        images = self.images

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.headers.get("Authorization") != f"Token {ImageServer.API_KEY}":
                    self.send_error(401)
                    return
                data = images.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, data: bytes) -> str:
        """Register an image; returns its task URL ``/data/upload/1/<name>.png``."""
        name = f"data/upload/1/{uuid.uuid4().hex}.png"
        self.images[name] = data
        return f"/{name}"

    def close(self) -> None:
        self.server.shutdown()


def scene_png(rng: np.random.Generator) -> bytes:
    """A 640x480 RGB PNG: smooth random background and a few coloured shapes (a fresh image every call)."""
    low = rng.uniform(40, 220, (6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((IMAGE_W, IMAGE_H), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.uniform(0, IMAGE_W - 80), rng.uniform(0, IMAGE_H - 80)
        x1, y1 = x0 + rng.uniform(40, 200), y0 + rng.uniform(40, 160)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def rect_region(rng: np.random.Generator, control: str = "label", image: str = "image") -> dict:
    """An unlabelled rectangle region as Label Studio serialises it (percent coordinates, random box)."""
    w, h = rng.uniform(10, 45), rng.uniform(10, 45)
    x, y = rng.uniform(0, 100 - w), rng.uniform(0, 100 - h)
    return {"id": uuid.uuid4().hex[:10], "from_name": control, "to_name": image, "type": "rectanglelabels",
            "original_width": IMAGE_W, "original_height": IMAGE_H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": []}}


class Client:
    """POST /predict with Label Studio's request shape."""

    def __init__(self, backend_url: str, label_config: str):
        self.url = f"{backend_url}/predict"
        self.label_config = label_config
        self.http = requests.Session()
        self.task_id = 0

    def task(self, image_url: str, regions: list[dict] | None = None) -> dict:
        self.task_id += 1
        anns = [{"id": self.task_id, "result": regions, "was_cancelled": False,
                 "created_at": "2026-01-01T00:00:00Z"}] if regions else []
        return {"id": self.task_id, "data": {"image": image_url}, "annotations": anns, "predictions": [],
                "drafts": [], "project": 1}

    def predict(self, tasks: list[dict], context: dict | None = None) -> tuple[float, dict]:
        body = {"tasks": tasks, "project": "1.1700000000", "label_config": self.label_config,
                "params": {"login": None, "password": None, "context": context}}
        t0 = time.perf_counter()
        resp = self.http.post(self.url, json=body, timeout=7200)
        dt = time.perf_counter() - t0
        if resp.status_code != 200:
            raise RuntimeError(f"/predict -> HTTP {resp.status_code}: {resp.text[:500]}")
        return dt, resp.json()


def labelled_regions(answer: dict) -> tuple[int, list[str]]:
    """Number of labelled regions in a /predict answer, and the per-task errors."""
    n, errors = 0, []
    for pred in answer["results"]:
        if isinstance(pred, dict) and "result" in pred:
            n += sum(1 for r in pred["result"] if r.get("type") == "rectanglelabels")
            errors += [e["error"] for e in pred.get("maskinv", {}).get("errors", [])]
        elif isinstance(pred, dict):
            errors.append(str(pred.get("error")))
    return n, errors


def job_timings(answer: dict) -> dict[str, float]:
    """The worker's own timings of the (single) job behind an interactive answer: total_s, forward_s, inversion_s."""
    try:
        return dict(answer["results"][0]["maskinv"]["jobs"][0]["timings"])
    except (KeyError, IndexError, TypeError):
        return {}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------------------------
# one configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Deployment:
    """Redis-backed backend + one worker for a configuration, in a fresh Redis namespace."""

    cfg: Config
    workdir: Path
    redis_url: str
    label_studio_url: str
    namespace: str = field(default_factory=lambda: f"maskinv-bench-{uuid.uuid4().hex[:8]}")
    backend: BackendServer | None = None
    worker: WorkerProcess | None = None

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis_url, "MASKINV_QUEUE": self.namespace, "MASKINV_REDIS_PREFIX": self.namespace,
                "MASKINV_MODEL": self.cfg.model, "MASKINV_PRETRAINED": self.cfg.pretrained,
                "MASKINV_SIZE": str(self.cfg.size), "MASKINV_TIMEOUT": "600", "MASKINV_BATCH_TIMEOUT": "3600",
                "MASKINV_JOB_TIMEOUT": "3600", "MASKINV_LOG_LEVEL": "INFO", "LABEL_STUDIO_URL": self.label_studio_url,
                "LABEL_STUDIO_API_KEY": ImageServer.API_KEY}

    def start(self) -> float:
        t0 = time.perf_counter()
        self.worker = WorkerProcess(self.workdir / f"{self.cfg.key}-worker.log", env=self.env())
        self.backend = BackendServer(self.workdir / f"{self.cfg.key}-backend.log", env=self.env())
        self.worker.start()
        self.backend.start(timeout_s=900)
        return time.perf_counter() - t0

    def stop(self) -> None:
        for proc in (self.backend, self.worker):
            if proc is not None:
                proc.stop()
        delete_namespace(self.redis_url, self.namespace)


def delete_namespace(redis_url: str, ns: str) -> None:
    """Remove the run's queue, registry, job and result-cache keys (everything with ``ns`` in its name)."""
    from redis import Redis

    from worker.protocol import delete_namespace as delete

    delete(Redis.from_url(redis_url), ns)


def run_config(cfg: Config, workdir: Path, redis_url: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    images = ImageServer()
    dep = Deployment(cfg, workdir, redis_url, images.url)
    out: dict[str, Any] = {"config": cfg.__dict__, "load_before": os.getloadavg()}
    try:
        out["startup_s"] = dep.start()
        client = Client(dep.backend.url, LABEL_CONFIG.read_text())
        print(f"[{cfg.key}] started in {out['startup_s']:.1f}s", flush=True)

        # first request after start-up: label prototypes, caption phrase banks (excluded from the statistics)
        dt, ans = client.predict([client.task(images.add(scene_png(rng)))], {"result": [rect_region(rng)]})
        out["first_request_s"] = dt
        print(f"[{cfg.key}] first request {dt:.2f}s", flush=True)

        cold, warm, cold_jobs, warm_jobs = [], [], [], []
        for _ in range(cfg.interactive_n):
            url = images.add(scene_png(rng))
            dt, ans = client.predict([client.task(url)], {"result": [rect_region(rng)]})
            assert labelled_regions(ans)[0] == 1, ans
            cold.append(dt)
            cold_jobs.append(job_timings(ans))
            dt, ans = client.predict([client.task(url)], {"result": [rect_region(rng)]})
            assert labelled_regions(ans)[0] == 1, ans
            warm.append(dt)
            warm_jobs.append(job_timings(ans))
            print(f"[{cfg.key}] interactive cold {cold[-1]:.2f}s warm {warm[-1]:.2f}s "
                  f"(worker: {cold_jobs[-1]} / {warm_jobs[-1]})", flush=True)
        out["interactive"] = {"cold_s": cold, "warm_s": warm, "cold_jobs": cold_jobs, "warm_jobs": warm_jobs}

        if cfg.batch_tasks:
            tasks = [client.task(images.add(scene_png(rng)), [rect_region(rng) for _ in range(cfg.batch_regions)])
                     for _ in range(cfg.batch_tasks)]
            dt, ans = client.predict(tasks)
            n, errors = labelled_regions(ans)
            out["batch"] = {"tasks": cfg.batch_tasks, "regions": cfg.batch_tasks * cfg.batch_regions,
                            "labelled": n, "errors": errors[:5], "wall_s": dt, "regions_per_s": n / dt}
            print(f"[{cfg.key}] batch {n} regions in {dt:.1f}s = {n / dt:.2f} regions/s", flush=True)
    finally:
        out["load_after"] = os.getloadavg()
        dep.stop()
        images.close()
    return out


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def report(runs: list[dict[str, Any]], total_s: float, commit: str | None = None, date: str | None = None) -> str:
    import torch

    lines = [
        "# Service benchmark: /predict through the HTTP API (queue mode, one worker)",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; Python {platform.python_version()}. "
        f"Commit `{commit or _git_commit()}`, {date or time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Whole run: "
        f"{total_s / 60:.1f} min.",
        "",
        "Deployment per row: Redis, `maskinv-backend` (`REDIS_URL` set, default 2 web workers x 4 threads) and one",
        "`python -m worker`; models random-initialised (`MASKINV_PRETRAINED=none`: weights do not change the cost);",
        "10 steps, 10 labels (`label_config/rectangle.xml`), 10 prompt templates, retrieval captions on; 640x480",
        "PNG task images served over HTTP. Latency = client-side wall time of one `POST /predict`. Every region is",
        "new (no result-cache hits). *cold* = an image the service has not seen (download, decode, ViT forward,",
        "inversion); *warm* = another region of the previous request's image (image-state cache hit).",
        "*batch* = one request with T tasks x 5 regions, as Label Studio's \"Retrieve Predictions\" sends it.",
        "*worker forward + inversion*: the worker's own timing of the job (ViT forward of the image, then the 10",
        "MaskInversion steps); *service overhead* = latency minus the worker's job time: image fetch and decode,",
        "region rasterising, Redis queueing and polling, label scoring and captions' JSON, HTTP.",
        "*first request* = the first request after start-up (text prototypes of the 10 labels x 10 templates and the",
        "caption phrase bank are computed then); *start-up* = until `/health` reports a worker with its model loaded.",
        "",
        "| model | size | interactive cold p50 / p95 (s) | interactive warm p50 / p95 (s) | n |"
        " worker forward + inversion, p50 (s) | service overhead cold / warm, p50 (s) | batch | batch regions/s |"
        " first request (s) | start-up (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        cfg = run["config"]
        inter = run.get("interactive", {})
        cold, warm = inter.get("cold_s", []), inter.get("warm_s", [])
        def fmt(xs):
            return f"{percentile(xs, 50):.2f} / {percentile(xs, 95):.2f}" if xs else "-"

        batch = run.get("batch")
        bcell = f"{batch['tasks']} x {cfg['batch_regions']} ({batch['wall_s']:.0f} s)" if batch else "-"
        rcell = f"{batch['regions_per_s']:.2f}" if batch else "-"
        def split(jobs: list[dict]) -> str:
            f = [j["forward_s"] for j in jobs if "forward_s" in j]
            i = [j["inversion_s"] for j in jobs if "inversion_s" in j]
            return f"{percentile(f, 50):.2f} + {percentile(i, 50):.2f}" if f and i else "-"

        def overhead(lat: list[float], jobs: list[dict]) -> str:
            d = [t - j["total_s"] for t, j in zip(lat, jobs) if "total_s" in j]
            return f"{percentile(d, 50):.2f}" if d else "-"

        wcell = f"cold {split(inter.get('cold_jobs', []))}; warm {split(inter.get('warm_jobs', []))}"
        ocell = f"{overhead(cold, inter.get('cold_jobs', []))} / {overhead(warm, inter.get('warm_jobs', []))}"
        first, startup = run.get('first_request_s', float('nan')), run.get('startup_s', float('nan'))
        lines.append(f"| {cfg['model']} | {cfg['size']} | {fmt(cold)} | {fmt(warm)} | {len(cold)} | {wcell} | {ocell} "
                     f"| {bcell} | {rcell} | {first:.2f} | {startup:.1f} |")
    lines += ["", "Notes:", ""]
    for run in runs:
        cfg = run["config"]
        la, lb = run["load_before"], run["load_after"]
        note = f"- {cfg['model']} @ {cfg['size']}: load average {la[0]:.1f} before, {lb[0]:.1f} after"
        if run.get("batch") and run["batch"]["labelled"] != run["batch"]["regions"]:
            note += f"; batch labelled {run['batch']['labelled']}/{run['batch']['regions']}: {run['batch']['errors']}"
        if run.get("error"):
            note += f"; FAILED: {run['error']}"
        lines.append(note + ".")
    lines += [
        "- The tiny model runs at 64 px (8x8 tokens): its compute is small, so its row shows what the service adds",
        "  around the model (HTTP, image fetch, Redis queue, labels and captions).",
        "- p95 of n samples is interpolated between the two slowest; with n <= 10 it is close to the maximum.",
        "- The load averages above count this benchmark's own backend and worker (about 2 on 2 cores when it runs",
        "  alone); a load well above 2 before a row means other jobs shared the CPU and inflated its times (the",
        "  service overhead column is the least affected).",
        "- One worker runs jobs one at a time, so a batch is sequential over its images; more workers (one per",
        "  core or GPU) serve the same queue in parallel.",
        "- ViT-B/16 at 448 px (the paper's setting) is measured for interactive requests only; a 50 x 5 batch at",
        "  448 would take longer than this benchmark's time budget.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=[c.key for c in CONFIGS], help="configurations to run")
    ap.add_argument("--interactive-n", type=int, help="override the number of cold/warm interactive pairs")
    ap.add_argument("--batch-tasks", type=int, help="override the number of batch tasks (0: no batch)")
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--out", default=str(RESULTS / "service.md"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", metavar="JSON", help="re-render the markdown from a previous run's JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        saved = json.loads(Path(args.report_only).read_text())
        Path(args.out).write_text(report(saved["runs"], saved["total_s"], saved.get("commit"), saved.get("date")))
        print(f"wrote {args.out}")
        return 0

    configs = [c for c in CONFIGS if not args.only or c.key in args.only]
    if args.interactive_n is not None or args.batch_tasks is not None:
        configs = [Config(c.key, c.model, c.pretrained, c.size,
                          args.interactive_n if args.interactive_n is not None else c.interactive_n,
                          args.batch_tasks if args.batch_tasks is not None and c.batch_tasks else c.batch_tasks)
                   for c in configs]
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="maskinv-bench-service-") as tmp:
        for k, cfg in enumerate(configs):
            try:
                runs.append(run_config(cfg, Path(tmp), args.redis_url, args.seed + k))
            except Exception as exc:  # noqa: BLE001 - keep the other configurations' numbers, say what failed
                print(f"[{cfg.key}] failed: {exc}", file=sys.stderr)
                logs = "\n".join((Path(tmp) / f"{cfg.key}-{p}.log").read_text()[-3000:]
                                 for p in ("worker", "backend") if (Path(tmp) / f"{cfg.key}-{p}.log").exists())
                print(logs, file=sys.stderr)
                runs.append({"config": cfg.__dict__, "error": f"{exc.__class__.__name__}: {str(exc)[:300]}",
                             "load_before": os.getloadavg(), "load_after": os.getloadavg()})
    total = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    commit, date = _git_commit(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.write_text(report(runs, total, commit, date))
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "total_s": total, "commit": commit, "date": date},
                                                   indent=1, default=float))
    print(f"wrote {out} ({total / 60:.1f} min)")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
