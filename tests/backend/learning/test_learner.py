"""Examples from Label Studio webhook events (embedded mode, tiny model, SQLite store) and prediction with them."""

from __future__ import annotations

import copy

import pytest

from backend_support import config, predict, rect, task

#: the project of the predict helper's requests ("1.1700000000")
PROJECT = {"id": 1, "label_config": config("rectangle")}


def created(ann_id: int, regions: list[dict], task_id: int = 1, seed: int = 0, action: str = "ANNOTATION_CREATED",
            **ann) -> dict:
    return {"action": action, "project": PROJECT,
            "annotation": {"id": ann_id, "task": task_id, "project": 1, "result": regions, "was_cancelled": False,
                           **ann},
            "task": task(task_id, seed)}


def examples(client, project: int = 1) -> dict:
    resp = client.get(f"/examples?project={project}")
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


@pytest.fixture
def learn_client(make_client, tmp_path):
    return make_client(MASKINV_DATA_DIR=str(tmp_path / "data"), MASKINV_WEBHOOK_QUEUE="0")


def test_created_annotation_records_each_labelled_region(learn_client):
    regions = [rect("a", labels=("car",)), rect("b", x=50, w=20, labels=("dog",)), rect("c", x=5, w=10, labels=())]
    resp = learn_client.post("/webhook", json=created(11, regions))
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["status"] == "stored"
    ex = examples(learn_client)
    assert ex["labels"] == {"car": 1, "dog": 1}  # the unlabelled region "c" is no example
    assert ex["annotations"] == 1 and ex["version"]


def test_repeated_event_is_idempotent_and_update_replaces(learn_client):
    body = created(11, [rect("a", labels=("car",)), rect("b", x=50, w=20, labels=("dog",))])
    learn_client.post("/webhook", json=body)
    v1 = examples(learn_client)["version"]
    again = learn_client.post("/webhook", json=copy.deepcopy(body)).get_json()
    assert again["status"] == "unchanged" and examples(learn_client)["version"] == v1
    upd = created(11, [rect("a", labels=("cat",))], action="ANNOTATION_UPDATED")
    assert learn_client.post("/webhook", json=upd).get_json()["status"] == "stored"
    ex = examples(learn_client)
    assert ex["labels"] == {"cat": 1} and ex["version"] != v1


def test_delete_removes_and_cancelled_gives_nothing(learn_client):
    learn_client.post("/webhook", json=created(11, [rect("a", labels=("car",))]))
    learn_client.post("/webhook", json=created(12, [rect("a", labels=("dog",))], task_id=2, seed=1))
    gone = learn_client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": PROJECT,
                                               "annotations": [{"id": 11}]}).get_json()
    assert gone["status"] == "deleted"
    assert examples(learn_client)["labels"] == {"dog": 1}
    # an annotation updated to cancelled (skipped) loses its examples; a new cancelled one adds none
    learn_client.post("/webhook", json=created(12, [rect("a", labels=("dog",))], task_id=2, seed=1,
                                               action="ANNOTATION_UPDATED", was_cancelled=True))
    learn_client.post("/webhook", json=created(13, [rect("a", labels=("car",))], was_cancelled=True))
    assert examples(learn_client)["count"] == 0


def test_projects_are_isolated_and_other_events_ignored(learn_client):
    learn_client.post("/webhook", json=created(11, [rect("a", labels=("car",))]))
    assert examples(learn_client, 8)["count"] == 0
    other = learn_client.post("/webhook", json={"action": "TASKS_CREATED", "project": PROJECT, "tasks": [{"id": 1}]})
    assert other.status_code == 200 and other.get_json()["status"] == "ignored"
    bad = learn_client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": "x/../1"}})
    assert bad.status_code == 400 and "project id" in bad.get_json()["error"]


def state(prediction: dict) -> str | None:
    """The example set a prediction was scored with (its regions' ``meta.examples_state``; one for all)."""
    states = {(r.get("meta") or {}).get("examples_state") for r in prediction["result"]}
    assert len(states) == 1, states
    return states.pop()


def test_prediction_uses_examples_keeps_the_version_and_names_the_example_set(learn_client):
    target = [rect("r1", labels=("car",))]
    before = predict(learn_client, "rectangle", [task(5, seed=3, annotations=[{"id": 99, "result": target}])]
                     ).get_json()
    v0 = before["results"][0]["model_version"]
    item0 = before["results"][0]["result"][0]
    assert item0["meta"]["examples"] == 0 and 0 <= item0["meta"]["margin"] <= 1
    labels = ("person", "car", "bicycle", "dog", "cat", "bird", "tree", "building", "road", "sky")
    for i, lab in enumerate(labels):  # every label gets an example elsewhere ...
        learn_client.post("/webhook", json=created(20 + i, [rect("a", x=40, y=5, w=30, h=30, labels=(lab,))],
                                                   task_id=20 + i, seed=10 + i))
    for i in range(2):  # ... and this very region was annotated "dog" twice
        learn_client.post("/webhook", json=created(40 + i, [rect("a", labels=("dog",))], task_id=40 + i, seed=3))
    after = predict(learn_client, "rectangle", [task(5, seed=3, annotations=[{"id": 99, "result": target}])]
                    ).get_json()
    pred = after["results"][0]
    # the version Label Studio compares stays; the example set is named where Label Studio compares nothing
    assert pred["model_version"] == v0 and state(before["results"][0]) is None
    assert state(pred).startswith("ex") and len(state(pred)) == 10
    best = pred["result"][0]
    assert best["value"]["rectanglelabels"] == ["dog"]
    assert best["meta"]["examples"] == 3
    # a project without examples is scored by text alone (no example set named)
    body = {"tasks": [task(5, seed=3, annotations=[{"id": 99, "result": target}])],
            "label_config": config("rectangle"), "project": "8.1700000000"}
    other = learn_client.post("/predict", json=body).get_json()
    assert other["results"][0]["model_version"] == v0 and state(other["results"][0]) is None


def test_examples_survive_a_restart(make_client, tmp_path):
    data = str(tmp_path / "data")
    c1 = make_client(MASKINV_DATA_DIR=data, MASKINV_WEBHOOK_QUEUE="0")
    c1.post("/webhook", json=created(11, [rect("a", labels=("car",))]))
    c2 = make_client(MASKINV_DATA_DIR=data, MASKINV_WEBHOOK_QUEUE="0")
    assert examples(c2)["labels"] == {"car": 1}


def test_learning_can_be_turned_off(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", MASKINV_LEARN="false")
    resp = c.post("/webhook", json=created(11, [rect("a", labels=("car",))]))
    assert resp.get_json()["status"] == "ignored"


@pytest.mark.parametrize("views", ["2", "1"])
def test_examples_and_their_predictions_share_the_views(make_client, tmp_path, views):
    """MASKINV_EXAMPLE_VIEWS: examples are embedded from that many views, and a prediction that uses them is made
    the same way (a prototype only matches embeddings made like its examples); zero-shot predictions use one."""
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", MASKINV_EXAMPLE_VIEWS=views)
    service = c.application.config["MASKINV_SERVICE"]
    sent: list = []
    label = service.dispatcher.label
    service.dispatcher.label = lambda reqs, timeout: sent.extend(r.params.views for r in reqs) or label(reqs, timeout)
    target = [rect("r1", labels=("car",))]
    predict(c, "rectangle", [task(5, seed=3, annotations=[{"id": 99, "result": target}])])
    assert sent == [1]
    c.post("/webhook", json=created(11, [rect("a", labels=("car",))]))
    (key,) = {e.model_key for e in service.learner.store.examples("1")}
    assert "views" not in key  # one- and two-view examples mix: a change of MASKINV_EXAMPLE_VIEWS keeps them
    after = predict(c, "rectangle", [task(5, seed=3, annotations=[{"id": 99, "result": target}])]).get_json()
    assert sent == [1, int(views)]
    assert state(after["results"][0]).startswith("ex")


def test_changing_the_views_keeps_the_examples_and_changes_the_example_state(make_client, tmp_path):
    data = str(tmp_path / "data")
    target = [rect("r1", labels=("car",))]
    one = make_client(MASKINV_DATA_DIR=data, MASKINV_WEBHOOK_QUEUE="0", MASKINV_EXAMPLE_VIEWS="1")
    one.post("/webhook", json=created(11, [rect("a", labels=("car",))]))
    p1 = predict(one, "rectangle", [task(5, seed=3, annotations=[{"id": 99, "result": target}])]
                 ).get_json()["results"][0]
    two = make_client(MASKINV_DATA_DIR=data, MASKINV_WEBHOOK_QUEUE="0", MASKINV_EXAMPLE_VIEWS="2")  # restarted
    assert examples(two)["labels"] == {"car": 1}
    p2 = predict(two, "rectangle", [task(5, seed=3, annotations=[{"id": 99, "result": target}])]
                 ).get_json()["results"][0]
    assert p1["model_version"] == p2["model_version"]
    assert state(p1).startswith("ex") and state(p2).startswith("ex") and state(p1) != state(p2)
