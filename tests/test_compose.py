"""docker-compose.yml is valid and says what docs/README promise: profiles gpu, cpu and demo; every build target is
a stage of the Dockerfile; the backend's health check fails while no worker is alive (``/health?ready=1``); the demo
runs the tiny scene model shipped in the image, offline. ``docker compose config`` checks the file where the
compose plugin is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]
#: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")


def in_profile(profile: str) -> set[str]:
    return {name for name, svc in SERVICES.items() if not svc.get("profiles") or profile in svc["profiles"]}


def test_each_profile_starts_one_complete_stack():
    always = {"label-studio", "redis"}
    assert in_profile("gpu") == always | {"backend", "worker"}
    assert in_profile("cpu") == always | {"backend", "worker-cpu"}
    assert in_profile("demo") == always | {"demo"}
    gpu = [n for n, s in SERVICES.items() if "devices" in str(s.get("deploy", {}))]
    assert gpu == ["worker"]  # nothing outside the gpu profile asks for a GPU


def test_build_targets_are_stages_of_the_dockerfile():
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE, re.M | re.I))
    targets = {s["build"]["target"] for s in SERVICES.values() if "build" in s}
    assert targets == {"backend", "worker", "worker-cpu"} and targets <= stages


def test_the_backend_is_unhealthy_without_a_worker_and_the_demo_until_its_model_loaded():
    for name in ("backend", "demo"):
        check = " ".join(SERVICES[name]["healthcheck"]["test"])
        assert "/health?ready=1" in check, name
    assert "/health?ready=1" in DOCKERFILE


def test_the_demo_runs_the_shipped_tiny_model_offline_in_embedded_mode():
    env = SERVICES["demo"]["environment"]
    assert env["REDIS_URL"] == "" and env["HF_HUB_OFFLINE"] == "1" and env["MASKINV_DEVICE"] == "cpu"
    for key in ("MASKINV_PRETRAINED", "MASKINV_CAPTIONER"):
        path = env[key].removeprefix("/app/")
        assert (ROOT / path).exists(), path
        assert f"COPY {path}" in DOCKERFILE or f"COPY {Path(path).parent}" in DOCKERFILE.replace("/ ./", " ./"), path
    assert set(SERVICES["backend"]["environment"]) <= set(env)  # every backend setting, as documented


def test_interpolations_are_well_formed():
    text = (ROOT / "docker-compose.yml").read_text()
    for line in text.splitlines():
        code = line.split(" #", 1)[0]
        assert code.count("${") == len(INTERPOLATION.findall(code)), line


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker is not installed")
def test_docker_compose_config_accepts_every_profile():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    for profile in ("gpu", "cpu", "demo"):
        done = subprocess.run(["docker", "compose", "--profile", profile, "config", "-q"], cwd=ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
