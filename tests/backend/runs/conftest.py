"""Run records of embedded services go to the test's own folder: a Service built from settings without
MASKINV_DATA_DIR would otherwise keep them in ./maskinv-data/runs.sqlite3, where the next test's GET /runs finds
them (backend.runs.file_store)."""

from __future__ import annotations

import pytest

from backend.runs import background, file_store


@pytest.fixture(autouse=True)
def own_run_records(monkeypatch, tmp_path):
    def store(data_dir: str, max_records: int) -> file_store.SqliteRunStore:
        return file_store.SqliteRunStore(tmp_path / "runs" / file_store.FILE_NAME, max_records)

    monkeypatch.setattr(background, "embedded_run_store", store)
