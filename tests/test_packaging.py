"""Packaging: docker-compose.yml / Dockerfile are well-formed, entry points resolve, every env var is documented."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    # the cpu worker, the demo and the search database are profiles (tests/test_compose.py)
    assert set(services) == {"label-studio", "redis", "backend", "worker", "worker-cpu", "demo", "pgvector"}
    assert services["label-studio"]["image"].startswith("heartexlabs/label-studio:1.23")
    assert all("healthcheck" in s for s in services.values())
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["backend"]["build"]["target"] == "backend" and services["worker"]["build"]["target"] == "worker"
    assert services["backend"]["environment"]["REDIS_URL"] == services["worker"]["environment"]["REDIS_URL"]
    assert any(v.startswith("models:") for v in services["worker"]["volumes"])
    assert set(compose["volumes"]) >= {"models", "label-studio-data"}
    for name in ("backend", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_dockerfile_targets():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM .* AS backend$", text, re.M) and re.search(r"^FROM .* AS worker$", text, re.M)
    assert 'CMD ["maskinv-backend"]' in text and 'CMD ["maskinv-worker"]' in text


def test_console_scripts_resolve():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for target in (scripts["maskinv-backend"], scripts["maskinv-worker"]):
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_every_variable_the_code_reads_is_in_the_configuration_table_and_compose_uses_only_documented_ones():
    """docs/configuration.md carries the configuration reference (tests/test_configuration_doc.py checks it against
    the settings classes); here: every variable any backend or worker module names, and every one compose sets."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    pattern = (r"\b(MASKINV_[A-Z_]+|BASIC_AUTH_[A-Z]+|LABEL_STUDIO_(?:URL|API_KEY)|LOCAL_FILES_DOCUMENT_ROOT"
               r"|REDIS_URL)\b")
    internal = {"MASKINV_SERVICE", "MASKINV_INSTALLED"}  # Flask app.config keys, not environment variables
    read = set()
    for path in list((ROOT / "backend").rglob("*.py")) + list((ROOT / "worker").rglob("*.py")):
        read |= set(re.findall(pattern, path.read_text()))
    compose = set(re.findall(pattern, (ROOT / "docker-compose.yml").read_text()))
    missing = sorted(n for n in (read | compose) - internal if f"`{n}`" not in doc)
    assert not missing, f"undocumented in docs/configuration.md: {missing}"


def test_the_access_log_never_shows_the_url_secret():
    import dataclasses
    from types import SimpleNamespace

    from gunicorn.config import Config

    from backend.http.serve import REDACTED, gunicorn_options
    from backend.settings import Settings

    secret = "s3cret-prefix-0123456789"
    opts = gunicorn_options(dataclasses.replace(Settings(), url_secret=secret))
    logger = opts["logger_class"](Config())
    req = SimpleNamespace(headers=[], method="POST", path=f"/{secret}/predict", query="", version=(1, 1),
                          uri=f"/{secret}/predict")
    environ = {"REQUEST_METHOD": "POST", "RAW_URI": f"/{secret}/predict", "PATH_INFO": f"/{secret}/predict",
               "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1"}
    resp = SimpleNamespace(status="200 OK", sent=2, response_length=2, headers=[])
    atoms = logger.atoms(resp, req, environ, __import__("datetime").timedelta(seconds=0.1))
    assert not any(secret in v for v in atoms.values() if isinstance(v, str))
    assert atoms["U"] == f"/{REDACTED}/predict"
