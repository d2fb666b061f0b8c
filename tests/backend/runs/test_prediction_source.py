"""The backend's model version becomes the project's prediction source in Label Studio (backend.runs
.prediction_source) when the project's source is empty, an ML backend's title or an earlier version of ours; a
source a curator chose otherwise is left alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from backend.labelstudio.api import LabelStudioAPI
from backend.runs.prediction_source import select_later, select_version, should_select

V = "maskinversion-ViT-B-16/openai-1234abcd"


@pytest.mark.parametrize("current, show, expected", [
    ("", True, True), ("MaskInversion", True, True), ("maskinversion-ViT-B-16/openai-0000aaaa", True, True),
    (V, True, False), ("uploaded-v3", True, False), ("", False, False)])
def test_which_sources_are_replaced(current, show, expected):
    project = {"model_version": current, "show_collab_predictions": show}
    assert should_select(project, {"MaskInversion"}, V) is expected


class FakeClient:
    def __init__(self, current: str):
        self.project = SimpleNamespace(model_version=current, show_collab_predictions=True)
        self.patches: list[dict] = []
        self.projects = SimpleNamespace(get=lambda id: self.project, update=self._update)
        self.ml = SimpleNamespace(list=lambda project: [SimpleNamespace(title="MaskInversion")])

    def _update(self, id: int, **fields):
        self.patches.append({"id": id, **fields})
        self.project.model_version = fields["model_version"]


def test_the_title_set_on_connecting_is_replaced_once():
    client = FakeClient("MaskInversion")
    api = LabelStudioAPI("http://ls.test", "t", client=client)
    assert select_version(api, 3, V) is True
    assert client.patches == [{"id": 3, "model_version": V}]
    assert select_version(api, 3, V) is False  # already the source


def test_select_later_asks_once_per_project_and_version():
    client = FakeClient("")
    api = LabelStudioAPI("http://ls.once", "t", client=client)
    first = select_later(lambda: api, api.url, 4, V, delays_s=(0,))
    assert first is not None
    first.join(10)
    assert select_later(lambda: api, api.url, 4, V, delays_s=(0,)) is None
    assert client.patches == [{"id": 4, "model_version": V}]


def test_a_refusal_is_tried_again_until_a_prediction_of_the_version_is_stored():
    client = FakeClient("MaskInversion")
    calls = []

    def refuse_first(id: int, **fields):
        calls.append(fields)
        if len(calls) == 1:  # Label Studio: "Model version doesn't exist either as live model or as static predictions"
            raise type("ApiError", (Exception,), {"status_code": 400})()
        client._update(id, **fields)

    client.projects.update = refuse_first
    api = LabelStudioAPI("http://ls.retry", "t", client=client)
    thread = select_later(lambda: api, api.url, 5, V, delays_s=(0, 0.1, 0.2))
    thread.join(10)
    assert len(calls) == 2 and client.patches == [{"id": 5, "model_version": V}]
