"""Load test: concurrent interactive clients against the backend (gunicorn, queue mode) and one worker, on loopback.

Starts a real deployment on this machine: a small HTTP server standing in for Label Studio's upload endpoint
(``/data/upload/...`` with token auth, ``N_IMAGES`` distinct 320x240 PNGs), one ``python -m worker`` process and
``python -m backend`` (gunicorn) with ``REDIS_URL`` set, on a fresh queue name / key prefix of the Redis at
``--redis-url`` (removed afterwards). Then ``--clients`` threads each send interactive ``/predict`` requests (one
task, one new random rectangle, as Label Studio sends while an annotator draws) back to back for
``--duration`` seconds, each with a client timeout of ``MASKINV_TIMEOUT`` + 15 s.

Reported: request count and rate, latency p50/p95/p99/max, answers by HTTP status and client-side timeouts
(a request "hangs" if it outlives its timeout), and the resident memory (RSS) of the worker and of the backend
processes at the start (after a warm-up request), at the end and at their maximum, next to the cache bounds
that should cap their growth. Writes ``benchmarks/results/load_test.md``.

    nice python benchmarks/load_test.py                      # 20 clients, 60 s, tiny model (~1.5 min of CPU)
    python benchmarks/load_test.py --clients 5 --duration 10 # a quick check
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results")
LABEL_CONFIG = (REPO_ROOT / "label_config" / "rectangle.xml").read_text()
TOKEN = "loadtest0123456789abcdef0123456789abcdef"
N_IMAGES, IMAGE_W, IMAGE_H = 24, 320, 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for k in range(N_IMAGES):
        arr = rng.integers(0, 256, (IMAGE_H // 8, IMAGE_W // 8, 3), dtype=np.uint8)
        img = Image.fromarray(arr).resize((IMAGE_W, IMAGE_H), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out[f"/data/upload/1/img{k}.png"] = buf.getvalue()
    return out


class _LabelStudioStandIn(BaseHTTPRequestHandler):
    images: dict[str, bytes] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.split("?filepath=")[-1]
        path = path if path.startswith("/") else "/data/" + path
        body = self.images.get(path)
        if self.headers.get("Authorization") != f"Token {TOKEN}" or body is None:
            self.send_response(404 if body is None else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Deployment:
    """Stand-in Label Studio + worker + gunicorn backend on a fresh Redis namespace."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.ns = f"maskinv-load-{uuid.uuid4().hex[:8]}"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        _LabelStudioStandIn.images = _images()
        self.ls = ThreadingHTTPServer(("127.0.0.1", 0), _LabelStudioStandIn)
        self.ls.daemon_threads = True
        threading.Thread(target=self.ls.serve_forever, daemon=True).start()
        self.ls_url = f"http://127.0.0.1:{self.ls.server_address[1]}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "REDIS_URL": args.redis_url,
                    "MASKINV_QUEUE": self.ns, "MASKINV_REDIS_PREFIX": self.ns, "MASKINV_MODEL": args.model,
                    "MASKINV_PRETRAINED": args.pretrained, "MASKINV_DEVICE": "cpu", "MASKINV_SIZE": str(args.size),
                    "MASKINV_STEPS": str(args.steps), "MASKINV_TIMEOUT": str(args.timeout),
                    "MASKINV_CACHE_MB": str(args.worker_cache_mb), "MASKINV_IMAGE_CACHE_MB": str(args.image_cache_mb),
                    "MASKINV_WEB_WORKERS": str(args.web_workers), "MASKINV_WEB_THREADS": str(args.web_threads),
                    "MASKINV_HOST": "127.0.0.1", "MASKINV_PORT": str(self.port), "MASKINV_LOG_LEVEL": "WARNING",
                    "LABEL_STUDIO_URL": self.ls_url, "LABEL_STUDIO_API_KEY": TOKEN, "OMP_NUM_THREADS": "1"}
        self.logs = workdir
        self.worker = subprocess.Popen([sys.executable, "-m", "worker", "--heartbeat", "1"], cwd=REPO_ROOT,
                                       env=self.env, stdout=(workdir / "worker.log").open("wb"),
                                       stderr=subprocess.STDOUT)
        self.backend = subprocess.Popen([sys.executable, "-m", "backend"], cwd=REPO_ROOT, env=self.env,
                                        stdout=(workdir / "backend.log").open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc, name in ((self.worker, "worker"), (self.backend, "backend")):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{(self.logs / f'{name}.log').read_text()[-3000:]}")
            try:
                health = requests.get(f"{self.url}/health", timeout=2).json()
                if health.get("ready"):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError("the deployment did not become ready")

    def backend_pids(self) -> list[int]:
        return [self.backend.pid, *children(self.backend.pid)]

    def rss(self) -> dict[str, float]:
        return {"worker": rss_mb(self.worker.pid), "backend": sum(rss_mb(p) for p in self.backend_pids())}

    def stop(self) -> None:
        for proc in (self.backend, self.worker):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.backend, self.worker):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.ls.shutdown()
        from redis import Redis

        conn = Redis.from_url(self.args.redis_url)
        keys = list(conn.scan_iter(match=f"*{self.ns}*", count=1000))
        result_keys = sum(1 for k in keys if b":result:" in k)
        if keys:
            conn.delete(*keys)
        for registry in ("rq:workers", "rq:queues"):
            members = [m for m in conn.smembers(registry) if self.ns.encode() in m]
            if members:
                conn.srem(registry, *members)
        self.result_keys = result_keys


def request_body(rng: random.Random) -> dict[str, Any]:
    k = rng.randrange(N_IMAGES)
    w, h = rng.uniform(10, 60), rng.uniform(10, 60)
    region = {"id": uuid.uuid4().hex[:10], "from_name": "label", "to_name": "image", "type": "rectanglelabels",
              "original_width": IMAGE_W, "original_height": IMAGE_H, "image_rotation": 0,
              "value": {"x": rng.uniform(0, 100 - w), "y": rng.uniform(0, 100 - h), "width": w, "height": h,
                        "rotation": 0, "rectanglelabels": []}}
    return {"tasks": [{"id": k + 1, "data": {"image": f"/data/upload/1/img{k}.png"}}], "label_config": LABEL_CONFIG,
            "params": {"context": {"result": [region]}}}


def run_clients(url: str, n: int, duration: float, client_timeout: float) -> list[tuple[float, str]]:
    """``[(latency_s, outcome)]``; outcome is the HTTP status or ``timeout`` / ``error:<type>``."""
    stop_at = time.monotonic() + duration
    out: list[tuple[float, str]] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        while time.monotonic() < stop_at:
            body = request_body(rng)
            t0 = time.monotonic()
            try:
                resp = session.post(f"{url}/predict", json=body, timeout=client_timeout)
                outcome = str(resp.status_code)
            except requests.Timeout:
                outcome = "timeout"
            except requests.RequestException as exc:
                outcome = f"error:{exc.__class__.__name__}"
            with lock:
                out.append((time.monotonic() - t0, outcome))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration + client_timeout + 30)
    return out


def sample_rss(dep: Deployment, stop: threading.Event, peaks: dict[str, float]) -> None:
    while not stop.wait(1.0):
        for k, v in dep.rss().items():
            peaks[k] = max(peaks.get(k, 0.0), v)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(args, samples, rss_start, rss_end, rss_peak, result_keys, wall: float) -> str:
    lat = [t for t, o in samples if o == "200"]
    all_lat = [t for t, _ in samples]
    outcomes = Counter(o for _, o in samples)
    errors = sum(n for o, n in outcomes.items() if o != "200")
    client_timeout = args.timeout + 15
    lines = [
        "# Load test: concurrent interactive clients (queue mode, one worker)",
        "",
        f"`python benchmarks/load_test.py --clients {args.clients} --duration {args.duration:g}` on {platform.node()} "
        f"({os.cpu_count()} CPU cores, shared with other jobs; load average at the start "
        f"{args.load_start:.1f}), {time.strftime('%Y-%m-%d')}.",
        "",
        f"Deployment on loopback: gunicorn backend ({args.web_workers} web workers x {args.web_threads} threads, queue "
        f"mode), one `python -m worker` (CPU), Redis at `{args.redis_url}` (fresh namespace), a stand-in Label Studio "
        f"serving {N_IMAGES} uploaded {IMAGE_W}x{IMAGE_H} PNGs with token auth. Model `{args.model}` "
        f"(pretrained `{args.pretrained}`), S = {args.size}, K = {args.steps} steps. Each client sends interactive "
        f"`/predict` requests back to back: one task, one new random rectangle on a random image (no result-cache "
        f"hits; the images soon hit the worker's image-state cache and the backend's image LRU). "
        f"`MASKINV_TIMEOUT` = {args.timeout:g} s, client timeout {client_timeout:g} s.",
        "",
        "| clients | duration | requests | req/s | p50 | p95 | p99 | max | errors | client timeouts |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.clients} | {wall:.0f} s | {len(samples)} | {len(samples) / wall:.1f} | {pct(lat, 50):.2f} s | "
        f"{pct(lat, 95):.2f} s | {pct(lat, 99):.2f} s | {max(all_lat) if all_lat else float('nan'):.2f} s | "
        f"{errors} | {outcomes.get('timeout', 0)} |",
        "",
        "Latencies are of the successful (HTTP 200) requests; max is over all requests. Answers by outcome: "
        + ", ".join(f"`{o}`: {n}" for o, n in sorted(outcomes.items())) + ".",
        "",
        f"Memory (resident set size, MiB; backend = gunicorn master + its web workers), sampled every second; "
        f"start = after a {args.warmup:g} s warm-up phase at the same concurrency (not counted above):",
        "",
        "| process | start (after warm-up) | end | peak | growth | bound on what grows |",
        "|---|---:|---:|---:|---:|---|",
        f"| worker | {rss_start['worker']:.0f} | {rss_end['worker']:.0f} | {rss_peak.get('worker', 0):.0f} | "
        f"{rss_end['worker'] - rss_start['worker']:+.0f} | image-state cache `MASKINV_CACHE_MB` = "
        f"{args.worker_cache_mb} |",
        f"| backend | {rss_start['backend']:.0f} | {rss_end['backend']:.0f} | {rss_peak.get('backend', 0):.0f} | "
        f"{rss_end['backend'] - rss_start['backend']:+.0f} | image LRU `MASKINV_IMAGE_CACHE_MB` = "
        f"{args.image_cache_mb} per web worker (x {args.web_workers}) |",
        "",
        f"Result cache: {result_keys} region results in Redis at the end (one per labelled region, "
        f"`MASKINV_RESULT_TTL`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the measured run")
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--model", default="maskinv-test-tiny")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=30.0, help="MASKINV_TIMEOUT of the backend")
    ap.add_argument("--worker-cache-mb", type=int, default=64)
    ap.add_argument("--image-cache-mb", type=int, default=16)
    ap.add_argument("--web-workers", type=int, default=2)
    ap.add_argument("--web-threads", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS / "load_test.md")
    args = ap.parse_args(argv)
    args.load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="maskinv-load-") as tmp:
        dep = Deployment(args, Path(tmp))
        try:
            dep.wait_ready()
            warm = requests.post(f"{dep.url}/predict", json=request_body(random.Random(-1)), timeout=300)
            if warm.status_code != 200:
                raise RuntimeError(f"warm-up request failed: {warm.status_code} {warm.text[:500]}")
            # a short warm-up phase at full concurrency: every web worker and thread has served requests, every
            # image has been seen, so what grows afterwards is what the caches and leaks add
            run_clients(dep.url, args.clients, args.warmup, args.timeout + 15)
            rss_start = dep.rss()
            peaks: dict[str, float] = dict(rss_start)
            stop = threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(dep, stop, peaks), daemon=True)
            sampler.start()
            t0 = time.monotonic()
            samples = run_clients(dep.url, args.clients, args.duration, args.timeout + 15)
            wall = time.monotonic() - t0
            stop.set()
            sampler.join()
            rss_end = dep.rss()
        finally:
            dep.stop()
    text = report(args, samples, rss_start, rss_end, peaks, getattr(dep, "result_keys", 0), wall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
