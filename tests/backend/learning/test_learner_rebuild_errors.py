"""Start training (``START_TRAINING`` on /webhook, or /train) for a bad or unknown project: a clear 400/404,
never a 500, never Label Studio's response headers or URLs with query strings in the answer."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from backend_support import config


class _FakeLabelStudio(BaseHTTPRequestHandler):
    """Knows project 7 only; everything else is Label Studio's 404, with a cookie and a request id header."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/api/projects/7":
            body = {"id": 7, "label_config": config("rectangle")}
            status = 200
        elif self.path.startswith("/api/tasks"):
            body, status = {"detail": "boom"}, 500
        else:
            body, status = {"detail": "Not found."}, 404
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Set-Cookie", "sessionid=SECRET-COOKIE; HttpOnly")
        self.send_header("X-Request-Id", "req-4242")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_ls() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def ls_client(make_client, tmp_path, fake_ls):
    return make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", LABEL_STUDIO_URL=fake_ls,
                       LABEL_STUDIO_API_KEY="token-xyz")


def clean(resp) -> str:
    text = resp.get_data(as_text=True)
    for leak in ("SECRET-COOKIE", "req-4242", "headers", "token-xyz", "?", "Traceback"):
        assert leak not in text, text
    return resp.get_json()["error"]


@pytest.mark.parametrize("project", ["²", "１２", "3/../4", "", "9" * 40, 1.5e300])
def test_a_bad_project_id_is_400(ls_client, project):
    for route, body in (("/webhook", {"action": "START_TRAINING", "project": {"id": project}}),
                        ("/train", {"project": project, "annotations": []})):
        resp = ls_client.post(route, json=body)
        assert resp.status_code == 400, (route, resp.get_json())
        assert "project" in clean(resp)


@pytest.mark.parametrize("project", [None, True])
def test_no_project_id_is_422(ls_client, project):
    resp = ls_client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project}})
    assert resp.status_code == 422 and "no project id" in clean(resp)


def test_a_project_unknown_to_label_studio_is_404(ls_client):
    for route, body in (("/webhook", {"action": "START_TRAINING", "project": {"id": 99}}),
                        ("/train", {"project": "99.1700000000", "annotations": []})):
        resp = ls_client.post(route, json=body)
        assert resp.status_code == 404, resp.get_json()
        assert "project 99" in clean(resp) and "not found" in clean(resp)


def test_label_studio_failing_is_502_without_its_headers(ls_client):
    resp = ls_client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert resp.status_code == 502, resp.get_json()
    assert "HTTP 500" in clean(resp)
