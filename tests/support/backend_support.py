"""Helpers shared by the backend and queue tests (no tests here; imported as ``backend_support``).

Kept out of conftest.py because tests/e2e has its own conftest and ``from conftest import ...`` is ambiguous.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from worker.protocol import delete_namespace  # noqa: F401 - the tests' Redis namespace cleanup, re-exported

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"

#: environment for a worker/engine on the tiny random-init test model
TINY_MODEL_ENV = {"MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu"}


def png_bytes(width: int = 80, height: int = 60, seed: int = 0) -> bytes:
    """A random RGB PNG ``[height, width, 3]``."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def two_masks(height: int = 60, width: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint rectangular region masks ``[H, W]`` on a ``png_bytes`` image: left and right."""
    a = np.zeros((height, width), bool)
    a[10:40, 5:30] = True
    b = np.zeros((height, width), bool)
    b[20:50, 40:75] = True
    return a, b


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# -- embedded-mode HTTP helpers (the tiny model; fixtures ``make_client``/``client`` are in conftest.py) -----------

CONFIGS = Path(__file__).resolve().parents[2] / "label_config"
#: fast inversion settings for embedded-mode tests
FAST = {"MASKINV_SIZE": "64", "MASKINV_STEPS": "2", "MASKINV_WARMUP": "0"}
W, H = 80, 60


def config(name: str) -> str:
    """A shipped label config (``brush``, ``polygon``, ``rectangle``)."""
    return (CONFIGS / f"{name}.xml").read_text()


def rect(rid: str, x=10.0, y=10.0, w=40.0, h=50.0, rotation=0.0, labels=("car",)) -> dict:
    return {"id": rid, "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": W,
            "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": list(labels)}}


def poly(rid: str, points) -> dict:
    return {"id": rid, "from_name": "label", "to_name": "image", "type": "polygonlabels", "original_width": W,
            "original_height": H, "value": {"points": points, "polygonlabels": ["car"]}}


def brush(rid: str, mask: np.ndarray) -> dict:
    from label_studio_sdk.converter.brush import mask2rle

    return {"id": rid, "from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": mask.shape[1],
            "original_height": mask.shape[0], "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["car"]}}


def task(tid: int, seed: int = 0, **extra) -> dict:
    return {"id": tid, "data": {"image": data_uri(png_bytes(W, H, seed))}, **extra}


def predict(client, cfg_name: str, tasks: list, context: dict | None = None, **params):
    body = {"tasks": tasks, "label_config": config(cfg_name), "project": "1.1700000000",
            "params": {"login": None, "password": None, **({"context": context} if context else {}), **params}}
    return client.post("/predict", json=body)


def labelled(result: list, rtype: str) -> dict[str, dict]:
    return {r["id"]: r for r in result if r["type"] == rtype}


# -- queue mode: worker processes and backend clients on a namespace (queue name = key prefix) ----------------

ROOT = Path(__file__).resolve().parents[2]
WORKER_START_S = 240  # model load on 2 busy cores


class WorkerProcess:
    """A ``python -m worker`` subprocess (tiny model) with its log in a file."""

    def __init__(self, ns: str, log_dir: Path, heartbeat: float = 1.0, **env: str):
        self.ns = ns
        self.name = f"{ns}-w{uuid.uuid4().hex[:4]}"
        self.log = log_dir / f"{self.name}.log"
        # the worker re-applies the service limits: give it the same as the test backend (settings() below)
        full_env = {**os.environ, **TINY_MODEL_ENV, "PYTHONPATH": str(ROOT), "REDIS_URL": REDIS_URL,
                    "MASKINV_MAX_STEPS": "1000", **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--queue", ns, "--prefix", ns, "--name", self.name,
             "--heartbeat", str(heartbeat)],
            cwd=ROOT, env=full_env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, conn) -> None:
        from worker.queue_worker import WorkerRegistry

        registry = WorkerRegistry(conn, self.ns, prefix=self.ns)
        deadline = time.monotonic() + WORKER_START_S
        while time.monotonic() < deadline:
            if self.name in registry.live_workers():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"worker did not start; log:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def settings_for(ns: str, **env):
    """Queue-mode backend settings on namespace ``ns`` (fast inversion defaults) plus ``env``."""
    from backend.settings import Settings

    base = {"REDIS_URL": REDIS_URL, "MASKINV_QUEUE": ns, "MASKINV_REDIS_PREFIX": ns, "MASKINV_SIZE": "64",
            "MASKINV_STEPS": "2", "MASKINV_TIMEOUT": "60", "MASKINV_BATCH_TIMEOUT": "60", "MASKINV_MAX_STEPS": "1000"}
    return Settings.from_env({**base, **{k: str(v) for k, v in env.items()}})


def client_for(ns: str, **env):
    """A Flask test client of the backend in queue mode (see :func:`settings_for`)."""
    from backend.http.app import create_app
    from backend.service import Service

    return create_app(service=Service(settings_for(ns, **env))).test_client()
