"""``maskinv-annotate`` (backend.cli.annotate) writes only into tasks of ``--project`` and under the model version
``/setup`` answers for that project (the same with examples), and in embedded mode records its run under
MASKINV_DATA_DIR, where the backend's ``GET /runs`` reads it."""

from __future__ import annotations

import json
from concurrent.futures import Future

from backend.cli import annotate as annotate_cli

from backend.learning import learner as learning

from backend.runs import project_run
from backend.runs.file_store import embedded_run_store
from backend_support import FAST, TINY_MODEL_ENV, config, rect
from fake_label_studio import FakeLabelStudio


def ls_task(tid: int, project: int) -> dict:
    ann = {"id": tid, "result": [rect(f"r{tid}")], "updated_at": "2024-01-01T00:00:00Z"}
    return {"id": tid, "project": project, "data": {"image": f"/data/upload/{project}/{tid}.png"},
            "annotations": [ann], "predictions": []}


def test_annotate_writes_only_the_projects_tasks_with_the_setup_version(monkeypatch, tmp_path):
    api = FakeLabelStudio(projects={1: config("rectangle"), 2: config("polygon")},
                          tasks={1: ls_task(1, 1), 2: ls_task(2, 1), 50: ls_task(50, 2)})
    import backend.labelstudio.api

    monkeypatch.setattr(backend.labelstudio.api, "LabelStudioAPI", lambda url, token, **kw: api)
    for k, v in {**FAST, **TINY_MODEL_ENV, "MASKINV_MODEL_VERSION": "maskinversion-cli-v1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("MASKINV_DATA_DIR", str(tmp_path / "data"))
    done: Future = Future()
    done.set_result(None)
    monkeypatch.setattr("backend.dispatch.embedded.EmbeddedDispatcher.warm_up", lambda self: done)
    monkeypatch.setattr(learning.Learner, "version_suffix",
                        lambda self, project, params: "-ex12345678" if str(project) == "1" else "")

    def fake(service, cfg, tasks, context=None, overrides=None, timeout_s=None, project=None):
        return [{"result": [{"id": f"r{t['id']}", "type": "rectanglelabels", "value": {"rectanglelabels": ["car"]}}],
                 "score": 0.5, "maskinv": {"labelled": 1, "errors": []}} for t in tasks]
    monkeypatch.setattr(project_run, "predict_tasks", fake)
    summary = tmp_path / "summary.json"
    code = annotate_cli.main(["--url", "http://ls.test", "--token", "t", "--project", "1", "--tasks", "1,2,50",
                              "--no-progress", "--state-dir", str(tmp_path), "--summary-json", str(summary)])
    assert code == 1  # task 50 failed: another project's
    version = "maskinversion-cli-v1"
    assert api.preds == {1: [version], 2: [version]}
    out = json.loads(summary.read_text())
    assert out["model_version"] == version and out["labelled"] == 2 and out["failed"] == 1
    assert "task 50 belongs to project 2, not to project 1" in out["failures"][0]["reason"]
    (run,) = embedded_run_store(str(tmp_path / "data"), 200).runs()
    assert run["kind"] == "annotate" and run["state"] == "done" and run["done"] == 2 and run["failed"] == 1
