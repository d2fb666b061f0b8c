"""One model version per project: /setup, /predict's top-level ``model_version``, background runs and
maskinv-annotate answer the same string (Service.project_version), whatever the project's examples; the example
set is named apart (Service.examples_state), in the predictions' regions' ``meta.examples_state``."""

from __future__ import annotations

from typing import Any

import pytest

from backend.dispatch import Dispatcher
from backend.http.app import create_app
from backend.learning import learner as learning
from backend.runs import background, project_run
from backend.service import Service
from backend.settings import Settings
from backend_support import FAST, config

SUFFIX = "-ex12345678"


class ModelOnly(Dispatcher):
    """A dispatcher that names a model and runs nothing (no task of these requests needs a job)."""

    def __init__(self) -> None:
        pass

    def model_info(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        return {"id": "ViT-B-16/openai", "name": "ViT-B-16"}

    def health(self) -> dict[str, Any]:
        return {"mode": "embedded", "ready": True}


@pytest.fixture
def service(monkeypatch) -> Service:
    monkeypatch.setattr(learning.Learner, "version_suffix",
                        lambda self, project, params: SUFFIX if str(project).split(".")[0] == "1" else "")
    return Service(Settings.from_env({**FAST, "MASKINV_LEARN": "true"}), dispatcher=ModelOnly())


@pytest.mark.parametrize("project, suffix", [("1.1700000000", SUFFIX), ("2.1700000000", "")])
def test_setup_predict_background_and_annotate_answer_one_version(service, project, suffix):
    """The version is the same with examples (project 1) as without (project 2): accepting annotations never makes
    Label Studio treat the project's predictions as stale."""
    xml = config("rectangle")
    cfg = service.config(xml)
    client = create_app(service=service).test_client()
    setup = client.post("/setup", json={"schema": xml, "project": project}).get_json()["model_version"]
    predicted = client.post("/predict", json={"tasks": [], "label_config": xml, "project": project}).get_json()
    annotate = project_run.run_version(service, cfg, project.split(".")[0])
    params, labels = service.params(None)
    batch = service.project_version(cfg, params, labels, background._project_id(project))
    assert setup.startswith("maskinversion-ViT-B-16/openai-") and "-ex" not in setup
    assert predicted["model_version"] == annotate == batch == setup == service.model_version(cfg)
    assert service.examples_state(project) == suffix.lstrip("-")


def test_overrides_change_the_version_of_predict_and_background_alike(service):
    xml = config("rectangle")
    cfg = service.config(xml)
    client = create_app(service=service).test_client()
    body = {"tasks": [], "label_config": xml, "project": "1.17", "params": {"maskinv": {"steps": 3}}}
    predicted = client.post("/predict", json=body).get_json()["model_version"]
    params, labels = service.params({"steps": 3})
    assert predicted == service.project_version(cfg, params, labels, "1") != service.project_version(cfg, project="1")
    assert "-ex" not in predicted


def test_stamp_examples_names_the_example_set_in_every_region_meta(service):
    answers = [{"result": [{"id": "a", "meta": {"margin": 0.5}}, {"id": "b"}], "score": 0.4},
               {"error": "image unreadable"}, []]
    service.stamp_examples(answers, "ex12345678")
    assert [r["meta"]["examples_state"] for r in answers[0]["result"]] == ["ex12345678"] * 2
    assert answers[0]["result"][0]["meta"]["margin"] == 0.5 and answers[1] == {"error": "image unreadable"}
    untouched = [{"result": [{"id": "a", "meta": {}}]}]
    assert service.stamp_examples(untouched, "") == [{"result": [{"id": "a", "meta": {}}]}]
