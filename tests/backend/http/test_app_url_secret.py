"""MASKINV_URL_SECRET: every route is served only under ``/<secret>/`` (Label Studio's model URL becomes
``http://backend:9090/<secret>``, and the webhook it registers for the backend is ``<model URL>/webhook``); the
bare routes answer 404, except ``GET /health`` and ``GET /``, which say only whether the backend is up.
Basic auth keeps applying where Label Studio sends it; its annotation webhooks carry none, and the secret
authenticates them."""

from __future__ import annotations

import base64

import pytest

from backend_support import config, predict, rect, task

SECRET = "s3cret-path-0123456789abcdef"
EVENT = {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": config("rectangle")},
         "annotation": {"id": 11, "task": 1, "result": [rect("a", labels=("car",))], "was_cancelled": False},
         "task": task(1)}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def secret_client(make_client, tmp_path):
    return make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", MASKINV_URL_SECRET=SECRET)


def test_bare_routes_are_404_and_store_nothing(secret_client):
    for method, path in (("POST", "/webhook"), ("POST", "/train"), ("POST", "/setup"), ("POST", "/predict"),
                         ("GET", "/examples?project=1"), ("GET", "/versions"), ("GET", "/runs"),
                         ("GET", "/is_training"), ("POST", "/webhook/"), ("POST", f"/{SECRET[:-1]}/webhook"),
                         ("POST", f"/{SECRET}x/webhook"), ("POST", f"/x/{SECRET}/webhook")):
        resp = secret_client.open(path, method=method, json=EVENT)
        assert resp.status_code == 404, (path, resp.get_data(as_text=True))
        assert SECRET[:8] not in resp.get_data(as_text=True)
    ex = secret_client.get(f"/{SECRET}/examples?project=1").get_json()
    assert ex["count"] == 0


def test_routes_under_the_secret_work(secret_client):
    stored = secret_client.post(f"/{SECRET}/webhook", json=EVENT)
    assert stored.status_code == 200 and stored.get_json()["status"] == "stored", stored.get_json()
    assert secret_client.get(f"/{SECRET}/examples?project=1").get_json()["labels"] == {"car": 1}
    setup = secret_client.post(f"/{SECRET}/setup", json={"schema": config("rectangle"), "project": "1.17"})
    assert setup.status_code == 200 and setup.get_json()["model_version"].startswith("maskinversion")
    body = {"tasks": [task(5, annotations=[{"id": 9, "result": [rect("r")]}])], "label_config": config("rectangle"),
            "project": "1.1700000000"}
    assert secret_client.post(f"/{SECRET}/predict", json=body).status_code == 200


def test_bare_health_says_only_up_and_ready(secret_client):
    for path in ("/health", "/"):
        bare = secret_client.get(path)
        assert bare.status_code == 200 and set(bare.get_json()) == {"status", "ready"}
    full = secret_client.get(f"/{SECRET}/health").get_json()
    assert full["model_class"] == "MaskInversionModel"


def test_basic_auth_still_applies_but_webhooks_need_only_the_secret(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", MASKINV_URL_SECRET=SECRET,
                    BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="pw")
    # Label Studio's annotation webhooks carry no credentials (webhooks/utils.py run_webhook_sync)
    hook = c.post(f"/{SECRET}/webhook", json=EVENT)
    assert hook.status_code == 200 and hook.get_json()["status"] == "stored", hook.get_json()
    # everything else it sends with the model's basic auth (ml/api_connector.py _prepare_kwargs)
    assert c.get(f"/{SECRET}/examples?project=1").status_code == 401
    assert c.get(f"/{SECRET}/examples?project=1", headers=basic("ls", "pw")).status_code == 200
    assert c.post("/webhook", json=EVENT, headers=basic("ls", "pw")).status_code == 404


def test_without_a_secret_the_bare_routes_are_served(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0")
    assert c.post("/webhook", json=EVENT).get_json()["status"] == "stored"
    assert predict(c, "rectangle", [task(5, annotations=[{"id": 9, "result": [rect("r")]}])]).status_code == 200
