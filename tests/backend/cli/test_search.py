"""``maskinv-search``: backfill a project from (a stand-in for) Label Studio's API, then query it as a table and as
JSON; bad arguments exit 2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from backend_support import FAST, config, rect, task

from backend.cli import search as cli


class FakeTasks:
    def __init__(self, tasks: list[dict]):
        self.tasks = tasks

    def list(self, project: int, fields: str, page: int, page_size: int):
        return SimpleNamespace(items=self.tasks[(page - 1) * page_size: page * page_size])


def fake_client() -> SimpleNamespace:
    t1 = task(1, 1, annotations=[{"id": 11, "task": 1, "was_cancelled": False,
                                 "result": [rect("a", labels=("car",)), rect("b", x=50, w=20, labels=("dog",))]}],
              predictions=[])
    t2 = task(2, 2, annotations=[], predictions=[{"id": 21, "score": 0.4, "result": [
        {**rect("c", labels=("car",)), "score": 0.7, "origin": "prediction"},
        {**rect("d", x=55, w=20, labels=("dog",)), "score": 0.3, "meta": {"proposed": True}}]}])
    return SimpleNamespace(projects=SimpleNamespace(get=lambda id: SimpleNamespace(label_config=config("rectangle"))),
                           tasks=FakeTasks([t1, t2]), predictions=SimpleNamespace(list=lambda task: []))


@pytest.fixture
def env(tiny_runtime, tmp_path, monkeypatch):
    for k, v in {**FAST, "MASKINV_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(k, str(v))
    client = fake_client()
    monkeypatch.setattr(cli.Service, "learner", property(lambda self: _learner(self, client)))
    return client


def _learner(service, client):
    learner = service.__dict__.get("_cli_learner")
    if learner is None:
        from backend.learning.learner import Learner

        learner = Learner(service.settings, service.dispatcher, service.fetcher, service.config,
                          service.setup_fallbacks, service.worker_model, open_store=service.open_example_store)
        learner.search_index = service.search_index
        learner._client = lambda: client  # type: ignore[method-assign]
        service.__dict__["_cli_learner"] = learner
    return learner


def test_backfill_indexes_annotations_and_predictions_and_resumes(env, capsys):
    assert cli.main(["backfill", "1", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tasks"] == 2 and report["indexed_tasks"] == 2
    assert report["human_regions"] == 2 and report["predicted_regions"] == 2
    assert cli.main(["backfill", "1", "--no-progress"]) == 0  # a second run skips what is indexed
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["skipped_tasks"] == 2 and again["indexed_tasks"] == 0

    assert cli.main(["query", "--project", "1", "--text", "car", "-k", "10", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_region = {h["region"]: h for h in doc["hits"]}
    assert set(by_region) == {"a", "b", "p21:c", "p21:d"}
    assert by_region["a"]["source"] == "human" and by_region["p21:c"]["source"] == "suggested"
    assert by_region["p21:d"]["source"] == "proposed" and by_region["p21:c"]["score"] == pytest.approx(0.7)

    assert cli.main(["query", "--project", "1", "--coverage", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "coverage" in out and "p21:" in out.splitlines()[-1]
    assert cli.main(["query", "--project", "1", "--example", "1/1/a", "--sources", "suggested", "proposed"]) == 0
    assert "human" not in capsys.readouterr().out.split("\n", 2)[2]


def test_backfill_still_indexes_annotations_of_tasks_the_product_indexed_live(env, capsys):
    """A project predicted before its annotations were backfilled: the live ``suggested`` rows of task 1 do not
    make the backfill skip its annotation."""
    import numpy as np

    from backend.search.api import current_model
    from backend.search.records import RegionRecord
    from backend.service import Service
    from backend.settings import Settings

    service = Service(Settings.from_env())
    index = service.search_index
    model = current_model(service, 600)
    from worker.jobs.runtime import get_runtime

    dim = int(get_runtime().clip.embed_dim)
    index.index_records([RegionRecord(model=model, project="1", task=1, region="live", source="suggested")],
                        np.ones((1, dim), np.float32))
    index.close()
    assert cli.main(["backfill", "1", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["indexed_tasks"] == 2 and report["human_regions"] == 2, report


def test_a_bad_query_exits_2_and_names_the_field(env, capsys):
    assert cli.main(["query", "--project", "1", "--text", "x" * 201]) == 2
    assert "text" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["query", "--project", "1", "--example", "nope"])
    assert exc.value.code == 2
