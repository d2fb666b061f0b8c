"""Regions submitted untouched from a prediction (Label Studio 1.23's ``origin: "prediction"``) are no examples
unless the project opts in (MASKINV_LEARN_PREDICTED); edited and hand-drawn ones are."""

from __future__ import annotations

import pytest

from backend.learning.origin import learns_untouched, untouched
from backend.settings import Settings, SettingsError
from backend_support import config, rect, task

PROJECT = {"id": 1, "label_config": config("rectangle")}


def item(rid: str, origin: str | None, **kw) -> dict:
    out = rect(rid, **kw)
    if origin is not None:
        out["origin"] = origin
    return out


def caption(rid: str, origin: str | None) -> dict:
    out = {"id": rid, "from_name": "caption", "to_name": "image", "type": "textarea", "value": {"text": ["a car"]}}
    if origin is not None:
        out["origin"] = origin
    return out


def event(ann_id: int, regions: list[dict], project: dict = PROJECT) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": project, "task": task(1, 0),
            "annotation": {"id": ann_id, "task": 1, "project": project["id"], "result": regions,
                           "was_cancelled": False}}


def test_untouched_needs_every_item_of_the_region_to_say_prediction():
    assert untouched([item("a", "prediction"), caption("a", "prediction")], "a")
    assert not untouched([item("a", "prediction"), caption("a", "prediction-changed")], "a")
    assert not untouched([item("a", "prediction-changed")], "a")
    assert not untouched([item("a", "manual")], "a")
    assert not untouched([item("a", None)], "a")  # API-made annotations carry no origin: a person's
    assert not untouched([item("b", "prediction")], "a")


@pytest.mark.parametrize("value, expected", [("", ()), ("off", ()), ("on", ("*",)), ("all", ("*",)),
                                             ("3, 7", ("3", "7"))])
def test_the_opt_in_names_projects_or_all(value, expected):
    settings = Settings.from_env({"MASKINV_LEARN_PREDICTED": value})
    assert settings.learn_predicted == expected
    assert learns_untouched(expected, "3") == bool(expected)
    assert learns_untouched(expected, "4") == (expected == ("*",))


def test_a_bad_opt_in_names_the_variable():
    with pytest.raises(SettingsError, match="MASKINV_LEARN_PREDICTED"):
        Settings.from_env({"MASKINV_LEARN_PREDICTED": "project three"})


def test_submitted_untouched_gives_no_example_edited_and_drawn_do(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0")
    ans = c.post("/webhook", json=event(11, [item("a", "prediction"), item("b", "prediction", x=50, w=20)]))
    assert ans.get_json()["untouched"] == 2 and ans.get_json().get("examples", 0) == 0, ans.get_json()
    assert c.get("/examples?project=1").get_json()["count"] == 0
    edited = [item("a", "prediction-changed", labels=("dog",)), item("b", "prediction", x=50, w=20),
              item("c", "manual", x=5, w=10, labels=("cat",))]
    ans = c.post("/webhook", json=event(11, edited) | {"action": "ANNOTATION_UPDATED"}).get_json()
    assert ans["status"] == "stored" and ans["untouched"] == 1 and ans["examples"] == 2, ans
    assert c.get("/examples?project=1").get_json()["labels"] == {"dog": 1, "cat": 1}


def test_a_project_that_opts_in_learns_from_untouched_regions(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", MASKINV_LEARN_PREDICTED="1")
    ans = c.post("/webhook", json=event(11, [item("a", "prediction")])).get_json()
    assert ans["status"] == "stored" and ans["examples"] == 1 and "untouched" not in ans, ans
