"""worker.env.env_int: the one way the worker reads integer settings."""

from __future__ import annotations

import pytest

from worker.env import env_int
from worker.payload import PayloadError


def test_unset_or_blank_gives_the_default_and_numbers_parse():
    assert env_int("X", 7, env={}) == 7
    assert env_int("X", 7, env={"X": "  "}) == 7
    assert env_int("X", 7, env={"X": " 12 "}) == 12


def test_bad_values_name_the_variable_in_the_callers_error_type():
    with pytest.raises(ValueError, match=r"X must be an integer, got 'ten'"):
        env_int("X", 7, env={"X": "ten"})
    with pytest.raises(ValueError, match=r"X must be >= 0, got -1"):
        env_int("X", 7, minimum=0, env={"X": "-1"})
    with pytest.raises(PayloadError, match=r"worker misconfigured: X must be an integer"):
        env_int("X", 7, env={"X": "1.5"}, error=PayloadError, prefix="worker misconfigured: ")


def test_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("MASKINV_TEST_ENV_INT", "5")
    assert env_int("MASKINV_TEST_ENV_INT", 1) == 5
