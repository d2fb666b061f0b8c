"""Search hits become one prediction set per query in Label Studio (copied regions, scores), never annotations;
the same query twice writes nothing new."""

from __future__ import annotations

from types import SimpleNamespace

from backend.labelstudio.api import LabelStudioAPI
from backend.search.label_studio import write_prediction_set
from backend.search.records import RegionRecord, SearchHit

RECT = {"id": "a", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "origin": "prediction",
        "value": {"x": 1, "y": 2, "width": 3, "height": 4, "rectanglelabels": ["car"]}}
CAPTION = {"id": "a", "from_name": "caption", "to_name": "image", "type": "textarea", "value": {"text": ["a car"]}}


class FakeSDK:
    def __init__(self) -> None:
        self.tasks_data = {
            1: {"id": 1, "project": 3, "annotations": [{"id": 11, "result": [RECT, CAPTION]}], "predictions": []},
            2: {"id": 2, "project": 3, "annotations": [],
                "predictions": [{"id": 21, "result": [{**RECT, "id": "b"}], "model_version": "m"}]},
            3: {"id": 3, "project": 3, "annotations": [], "predictions": []}}
        self.created: list[dict] = []
        self.tasks = SimpleNamespace(get=lambda id: self.tasks_data[id])
        self.predictions = SimpleNamespace(list=self._list, create=self._create)
        self.annotations = SimpleNamespace(create=lambda **kw: (_ for _ in ()).throw(AssertionError("annotation")))

    def _list(self, task: int):
        return [SimpleNamespace(model_version=c["model_version"]) for c in self.created if c["task"] == task]

    def _create(self, **kw):
        self.created.append(kw)
        return SimpleNamespace(id=len(self.created))


def hit(task: int, region: str, sim: float, annotation: str = "", source: str = "human") -> SearchHit:
    return SearchHit(RegionRecord(model="m", project="3", task=task, region=region, annotation=annotation,
                                  source=source), sim)


def test_hits_become_one_prediction_per_task_under_the_query_version():
    sdk = FakeSDK()
    api = LabelStudioAPI("http://ls", "t", client=sdk)
    hits = [hit(1, "a", 0.9, annotation="11"), hit(2, "p21:b", 0.7, source="suggested"),
            hit(3, "gone", 0.5, annotation="99")]
    out = write_prediction_set(api, "3", hits, "abc123")
    assert out["model_version"] == "search:abc123" and out["tasks"] == 2 and out["regions"] == 2
    assert out["missing"] == [{"task": 3, "region": "gone", "why": "region no longer there"}]
    first = next(c for c in sdk.created if c["task"] == 1)
    assert first["model_version"] == "search:abc123" and first["score"] == 0.9
    assert [it["type"] for it in first["result"]] == ["rectanglelabels", "textarea"]
    assert all("origin" not in it and "similarity 0.900" in it["meta"]["text"][0] for it in first["result"])
    assert first["result"][0]["value"] == RECT["value"]
    second = next(c for c in sdk.created if c["task"] == 2)
    assert second["result"][0]["id"] == "b"
    again = write_prediction_set(api, "3", hits, "abc123")
    assert again["tasks"] == 0 and again["already"] == 2 and len(sdk.created) == 2


def test_a_task_of_another_project_is_never_written():
    sdk = FakeSDK()
    sdk.tasks_data[1]["project"] = 4
    out = write_prediction_set(LabelStudioAPI("http://ls", "t", client=sdk), "3", [hit(1, "a", 0.9, "11")], "d")
    assert out["tasks"] == 0 and out["missing"][0]["why"] == "not a task of the project" and not sdk.created
