"""Embedded mode's run records in SQLite under MASKINV_DATA_DIR (backend.runs.file_store): a maskinv-annotate run
in its own process shows in the embedded backend's GET /runs, running while it beats, then done."""

from __future__ import annotations

import time

from backend.runs.file_store import embedded_run_store
from backend.runs.store import RunStatus


def test_a_run_of_another_process_shows_with_its_liveness(tmp_path):
    annotate = embedded_run_store(str(tmp_path), 200)  # maskinv-annotate's process
    backend = embedded_run_store(str(tmp_path), 200)  # the backend's process
    status = RunStatus(id="annotate-1", kind="annotate", project="3", model_version="v", total=4, queued=4)
    annotate.beat(status.id)
    annotate.save(status)
    (shown,) = backend.runs()
    assert shown["id"] == "annotate-1" and shown["state"] == "running" and shown["total"] == 4
    status.state, status.done, status.queued, status.finished_at = "done", 4, 0, time.time()
    annotate.save(status)
    annotate.end(status.id)
    (shown,) = backend.runs()
    assert shown["state"] == "done" and shown["done"] == 4


def test_a_run_that_stopped_beating_shows_as_interrupted(tmp_path):
    other = embedded_run_store(str(tmp_path), 200)
    other.save(RunStatus(id="annotate-2", kind="annotate", project="3", model_version="v"))
    assert embedded_run_store(str(tmp_path), 200).runs()[0]["state"] == "interrupted"


def test_records_are_bounded(tmp_path):
    store = embedded_run_store(str(tmp_path), 3)
    now = time.time()
    for i in range(6):
        store.save(RunStatus(id=f"r{i}", kind="annotate", project="1", model_version="v", state="done",
                             started_at=now + i, updated_at=now + i, finished_at=now + i))
    assert {r["id"] for r in embedded_run_store(str(tmp_path), 3).runs()} == {"r3", "r4", "r5"}

