"""GET /health?ready=1 (the container health check) is 503 while the backend is not ready: no live worker in
queue mode. Plain /health stays 200 (UP) then, and says why in ``ready`` and ``workers``."""

from __future__ import annotations

from typing import Any

from backend.dispatch import Dispatcher
from backend.http.app import create_app
from backend.service import Service
from backend.settings import Settings
from backend_support import FAST


class NoWorker(Dispatcher):
    """Queue mode with Redis answering and no worker alive."""

    mode = "queue"

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers

    def model_info(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        return None

    def health(self) -> dict[str, Any]:
        return {"mode": "queue", "ready": self.workers > 0, "redis": "ok", "workers": self.workers}


def client(workers: int):
    service = Service(Settings.from_env({**FAST, "MASKINV_LEARN": "false"}), dispatcher=NoWorker(workers))
    return create_app(service=service).test_client()


def test_not_ready_without_a_worker_only_when_asked():
    c = client(0)
    plain = c.get("/health")
    assert plain.status_code == 200 and plain.get_json()["ready"] is False and plain.get_json()["workers"] == 0
    ready = c.get("/health?ready=1")
    assert ready.status_code == 503 and ready.get_json()["status"] == "DOWN"


def test_ready_with_a_worker():
    assert client(1).get("/health?ready=1").status_code == 200
