"""GET /runs of an embedded backend lists the runs recorded under its MASKINV_DATA_DIR, maskinv-annotate's
(another process) included."""

from __future__ import annotations

import time

from backend.runs.file_store import embedded_run_store
from backend.runs.store import RunStatus


def test_get_runs_of_an_embedded_backend_lists_the_stored_runs(make_client, tmp_path):
    data = tmp_path / "data"
    embedded_run_store(str(data), 200).save(RunStatus(id="annotate-9", kind="annotate", project="1",
                                                      model_version="v", state="done", finished_at=time.time()))
    c = make_client(MASKINV_DATA_DIR=str(data))
    runs = c.get("/runs").get_json()["runs"]
    assert [(r["id"], r["state"]) for r in runs] == [("annotate-9", "done")]
