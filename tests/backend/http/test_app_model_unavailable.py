"""A model that cannot be loaded (offline site, wrong checkpoint path): the backend says so at once and is not
ready; /health is DOWN, /setup is an error Label Studio shows, /predict answers at once -- each naming
MASKINV_PRETRAINED and the offline demo."""

from __future__ import annotations

import time

import pytest

from backend_support import FAST, TINY_MODEL_ENV, config, predict, rect, task


@pytest.fixture
def broken_client(tmp_path, monkeypatch):
    from backend.http.app import create_app
    from backend.settings import Settings
    from worker.jobs import runtime

    for k, v in TINY_MODEL_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASKINV_PRETRAINED", str(tmp_path / "no-such-checkpoint.safetensors"))
    monkeypatch.setattr(runtime, "_runtime", None)
    app = create_app(Settings.from_env({**FAST, "MASKINV_WARMUP": "1"}))  # loads at start, as by default
    client = app.test_client()
    yield client
    monkeypatch.setattr(runtime, "_runtime", None)


def _wait_until_failed(client) -> dict:
    for _ in range(600):  # the load fails fast; this only waits for the background thread to run it
        body = client.get("/health").get_json()
        if body.get("model_error"):
            return body
        time.sleep(0.05)
    raise AssertionError("the model load neither failed nor finished")


def test_health_is_down_and_names_the_setting_and_the_offline_demo(broken_client):
    body = _wait_until_failed(broken_client)
    resp = broken_client.get("/health")
    assert resp.status_code == 503 and resp.get_json()["status"] == "DOWN"
    assert body["ready"] is False
    assert "MASKINV_PRETRAINED" in body["model_error"] and "maskinv-scene-tiny" in body["model_error"]


def test_setup_is_an_error_label_studio_shows(broken_client):
    _wait_until_failed(broken_client)
    resp = broken_client.post("/setup", json={"project": "1.1", "schema": config("rectangle")})
    assert resp.status_code == 503
    assert "MASKINV_PRETRAINED" in resp.get_data(as_text=True)


def test_predict_answers_at_once_instead_of_waiting_for_a_timeout(broken_client):
    _wait_until_failed(broken_client)
    resp = predict(broken_client, "rectangle", [task(1)], context={"result": [rect("r1")]})
    assert resp.status_code in (502, 503)  # the worker's failure, not a 504 after MASKINV_TIMEOUT
    assert "MASKINV_PRETRAINED" in resp.get_data(as_text=True)
