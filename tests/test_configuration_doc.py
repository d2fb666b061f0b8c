"""docs/configuration.md's table, the two settings classes and docker-compose.yml name the same variables.

The variables a settings class reads are found by running its ``from_env`` on a mapping that records every key
it is asked for, so nothing has to keep a second list of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from backend.settings import Settings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
TABLE_ROW = re.compile(r"^\|\s*((?:`[A-Z][A-Z0-9_]*`(?:,\s*)?)+)\s*\|", re.M)


class RecordingEnv(Mapping[str, str]):
    """A read-only environment that remembers every variable looked up in it."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self.values = dict(values or {})
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def variables_read(from_env) -> set[str]:
    """Every variable ``from_env`` looks up, in embedded and in queue mode."""
    names: set[str] = set()
    for values in ({}, {"REDIS_URL": "redis://127.0.0.1:6379/0"}):
        env = RecordingEnv(values)
        from_env(env)
        names |= env.read
    return names


def documented() -> set[str]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    return {name for cell in TABLE_ROW.findall(text) for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cell)}


def read_elsewhere(name: str) -> bool:
    """Whether ``name`` is read outside the settings classes (a string literal in backend/ or worker/)."""
    return any(f'"{name}"' in p.read_text() for pkg in ("backend", "worker") for p in (ROOT / pkg).rglob("*.py"))


def compose_environment(service: str) -> set[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return set(compose["services"][service].get("environment") or {})


BACKEND = variables_read(Settings.from_env)
WORKER = variables_read(WorkerSettings.from_env)


def test_recording_env_sees_the_settings_reads():
    assert {"MASKINV_URL_SECRET", "MASKINV_ORPHAN_GRACE", "REDIS_URL"} <= BACKEND
    assert {"MASKINV_MODEL", "MASKINV_CAPTIONER", "MASKINV_SAM_CHECKPOINT"} <= WORKER


def test_every_variable_the_settings_read_is_in_the_table():
    missing = sorted((BACKEND | WORKER) - documented())
    assert not missing, f"docs/configuration.md's table lacks {missing}"


def test_the_table_names_no_variable_that_is_gone():
    stale = sorted(n for n in documented() - BACKEND - WORKER if not read_elsewhere(n))
    assert not stale, f"docs/configuration.md's table names variables nothing reads: {stale}"


def test_compose_passes_each_variable_to_the_service_that_reads_it():
    missing = {service: sorted(names - compose_environment(service))
               for service, names in (("backend", BACKEND), ("worker", WORKER))}
    assert not any(missing.values()), f"docker-compose.yml does not set {missing}"


def test_compose_sets_no_project_variable_the_table_lacks():
    pattern = re.compile(r"^(MASKINV_|LABEL_STUDIO_URL$|LABEL_STUDIO_API_KEY$|BASIC_AUTH_|REDIS_URL$|LOCAL_FILES_)")
    names = {n for s in ("backend", "worker") for n in compose_environment(s) if pattern.match(n)}
    unknown = sorted(names - documented())
    assert not unknown, f"docker-compose.yml sets variables docs/configuration.md does not document: {unknown}"


def compose_defaults(service: str) -> tuple[dict[str, str], dict[str, str]]:
    """The service's environment with ``${NAME:-default}`` resolved to its default, and its fixed values alone."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = {k: str(v) for k, v in compose["services"][service]["environment"].items()}
    variable = re.compile(r"^\$\{[A-Z0-9_]+:-(.*)\}$")
    resolved = {k: (m.group(1) if (m := variable.match(v)) else v) for k, v in env.items()}
    fixed = {k: v for k, v in env.items() if not variable.match(v)}
    return resolved, fixed


def test_compose_defaults_are_the_settings_defaults():
    for service, from_env in (("backend", Settings.from_env), ("worker", WorkerSettings.from_env)):
        resolved, fixed = compose_defaults(service)
        assert from_env(resolved) == from_env(fixed), f"docker-compose.yml's {service} defaults differ from the code's"
