"""Run a real Label Studio and the MaskInversion ML backend as local processes, and talk to Label Studio's API.

Used by the end-to-end tests (``tests/e2e/conftest.py``), ``scripts/screenshot.py`` and
``benchmarks/bench_service.py``. Only the standard library and ``requests`` are needed here: Label Studio runs
from its own virtualenv (``scripts/label_studio_env.sh``), the backend from the project's.

Environment (all optional):

* ``MASKINV_LS_VENV``: Label Studio's virtualenv (default ``<repo>/.venv-ls``);
* ``MASKINV_BACKEND_BIN``: the backend's console script (default ``maskinv-backend`` next to the running Python);
* ``MASKINV_E2E_START_TIMEOUT``: seconds to wait for each server to answer ``/health`` (default 300).

Label Studio runs with its own defaults (legacy API tokens disabled): the harness logs in through the login
form, creates a personal access token (a JWT refresh token) the way the "Account & Settings" page does, and
sends ``Authorization: Bearer <access token>`` obtained from ``/api/token/refresh``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("MASKINV_LS_VENV", REPO_ROOT / ".venv-ls"))
START_TIMEOUT_S = float(os.environ.get("MASKINV_E2E_START_TIMEOUT", "300"))


#: the backend's environment in these tests (tiny random-init model; embedded mode: REDIS_URL is unset)
BACKEND_ENV = {
    "MASKINV_MODEL": "maskinv-test-tiny",
    "MASKINV_PRETRAINED": "none",
    "MASKINV_DEVICE": "cpu",
    "MASKINV_LOG_LEVEL": "INFO",
    # the tiny model has 8-px patches: 448 px would be 3136 tokens; 112 px (196) keeps each inversion well
    # under a second on 2 busy cores (cost grows about with the token count squared)
    "MASKINV_SIZE": "112",
}


class HarnessError(RuntimeError):
    """A server could not be started or Label Studio answered something unexpected."""


def started(server: Any) -> Any:
    """``server`` started (a LabelStudioServer, BackendServer, ...); on failure it is stopped and the test fails
    with the harness's message (no traceback: the message names what did not come up)."""
    import pytest  # here: scripts/label_studio_env.sh runs this module with Label Studio's Python, which has none

    try:
        server.start()
    except HarnessError as exc:
        server.stop()
        pytest.fail(str(exc), pytrace=False)
    return server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ManagedProcess:
    """A child process in its own process group, with stdout+stderr in ``log_path``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path = REPO_ROOT
    proc: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # also reaps worker children that ignored SIGTERM
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def wait_http(self, url: str, timeout_s: float = START_TIMEOUT_S,
                  ok=lambda r: r.status_code == 200) -> requests.Response:
        """Poll ``url`` until ``ok(response)``; raises HarnessError (with the log tail) if the process dies or time
        runs out."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.alive():
                raise HarnessError(f"{self.name} exited with code {self.proc.returncode if self.proc else '?'} "
                                   f"before {url} answered; log tail:\n{self.log_tail()}")
            try:
                resp = requests.get(url, timeout=5)
                if ok(resp):
                    return resp
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except requests.RequestException as exc:
                last = f"{exc.__class__.__name__}"
            time.sleep(0.5)
        raise HarnessError(f"{self.name} did not answer {url} within {timeout_s:.0f}s (last: {last}); "
                           f"log tail:\n{self.log_tail()}")


def _base_env() -> dict[str, str]:
    """The current environment minus variables that would leak into the child servers' configuration."""
    env = dict(os.environ)
    for key in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "VIRTUAL_ENV", "PYTHONPATH",
                "DJANGO_SETTINGS_MODULE", "LABEL_STUDIO_BASE_DATA_DIR", "DATABASE_NAME"):
        env.pop(key, None)
    return env


# --------------------------------------------------------------------------------------------------------------
# Label Studio
# --------------------------------------------------------------------------------------------------------------
def label_studio_bin() -> Path:
    exe = LS_VENV / "bin" / "label-studio"
    if not exe.exists():
        raise HarnessError(f"Label Studio is not installed at {LS_VENV} (MASKINV_LS_VENV); create it with "
                           "`bash scripts/label_studio_env.sh`, or deselect these tests with -m 'not e2e'")
    return exe


def label_studio_version() -> str:
    out = subprocess.run([str(LS_VENV / "bin" / "python"), "-c",
                          "import label_studio; print(label_studio.__version__)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def label_studio_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a throw-away Label Studio: SQLite in ``data_dir``, no telemetry, local ML backends allowed."""
    env = _base_env()
    env.update({
        "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LATEST_VERSION_CHECK": "false",  # no PyPI call at start
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",  # the OSS build reports errors to Label Studio's Sentry by default
        "FRONTEND_SENTRY_DSN": "",
        # The ML backend is on 127.0.0.1. LS 1.23 blocks private/loopback URLs twice: for the ML backend
        # (ML_BLOCK_LOCAL_IP) and for the /webhook it registers on the backend when it is connected
        # (SSRF_PROTECTION_ENABLED; otherwise POST /api/ml/ answers 403 "URL resolves to a reserved network
        # address"). The same applies to a backend on a private Docker network.
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        # LS gives the backend 1 s for /health and 3 s for /setup; a 2-core CI runner busy with an inversion
        # can miss that, so allow more (predictions keep LS's default 100 s).
        "ML_CONNECTION_TIMEOUT": "5",
        "ML_TIMEOUT_HEALTH": "10",
        "ML_TIMEOUT_SETUP": "30",
        "LOCAL_FILES_SERVING_ENABLED": "false",  # not used; also stops LS auto-detecting a files root
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def migrated_database(cache_dir: Path | None = None) -> Path:
    """Path of an empty, fully migrated SQLite database for this Label Studio version (made once, then reused).

    Migrating a fresh database takes ~1.5 min on 2 cores; copying a migrated one takes milliseconds.
    """
    version = label_studio_version()
    cache_dir = cache_dir or (LS_VENV / ".maskinv-e2e-db")
    target = cache_dir / f"label_studio-{version}.sqlite3"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = cache_dir / f"migrate-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        # `label-studio version` applies the migrations, prints the version and exits
        proc = subprocess.run([str(label_studio_bin()), "version"], env=label_studio_env(work), cwd=work,
                              capture_output=True, text=True, timeout=900)
        db = work / "label_studio.sqlite3"
        if proc.returncode != 0 or not db.exists():
            raise HarnessError(f"migrating a Label Studio database failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(db, tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


@dataclass
class LabelStudioServer:
    """One Label Studio process on 127.0.0.1 with a fresh data dir and one admin user."""

    data_dir: Path
    username: str = "annotator@example.com"
    password: str = "maskinv-e2e-Passw0rd"
    port: int = 0
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "LabelStudioServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        db = self.data_dir / "label_studio.sqlite3"
        if not db.exists():
            shutil.copyfile(migrated_database(), db)
        self.port = self.port or free_port()
        argv = [str(label_studio_bin()), "start", "--no-browser", "--internal-host", "127.0.0.1",
                "--port", str(self.port), "--username", self.username, "--password", self.password]
        self.process = ManagedProcess("Label Studio", argv, label_studio_env(self.data_dir),
                                      self.data_dir / "label_studio.log", cwd=self.data_dir).start()
        try:
            self.process.wait_http(f"{self.url}/health", timeout_s)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def login_session(self) -> requests.Session:
        """A browser-like session logged in through the login form (cookies: sessionid, csrftoken)."""
        s = requests.Session()
        s.get(f"{self.url}/user/login/", timeout=30).raise_for_status()
        resp = s.post(f"{self.url}/user/login/", timeout=30, allow_redirects=False,
                      data={"email": self.username, "password": self.password,
                            "csrfmiddlewaretoken": s.cookies.get("csrftoken", "")},
                      headers={"Referer": f"{self.url}/user/login/"})
        if resp.status_code != 302 or "sessionid" not in s.cookies:
            raise HarnessError(f"login as {self.username} failed: HTTP {resp.status_code} {resp.text[:300]}")
        return s

    def personal_access_token(self) -> str:
        """Create the user's personal access token (JWT refresh token), as the Account page does."""
        s = self.login_session()
        resp = s.post(f"{self.url}/api/token/", timeout=30,
                      headers={"X-CSRFToken": s.cookies.get("csrftoken", ""), "Referer": f"{self.url}/"})
        if resp.status_code != 201 and resp.status_code != 200:
            raise HarnessError(f"POST /api/token/ failed: HTTP {resp.status_code} {resp.text[:300]}")
        return resp.json()["token"]


# --------------------------------------------------------------------------------------------------------------
# Label Studio API client
# --------------------------------------------------------------------------------------------------------------
def _jwt_exp(token: str) -> float:
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return float(json.loads(base64.urlsafe_b64decode(payload)).get("exp", 0))


class LabelStudioClient:
    """Label Studio REST API with a personal access token (refresh JWT -> Bearer access JWT, renewed as needed).

    Paths are LS 1.23's (``label_studio/*/urls.py``); trailing slashes matter (``APPEND_SLASH = False``).
    """

    def __init__(self, base_url: str, personal_access_token: str, timeout_s: float = 300.0):
        self.base_url = base_url.rstrip("/")
        self.pat = personal_access_token
        self.timeout_s = timeout_s
        self.http = requests.Session()
        self._access: str | None = None
        self._access_exp = 0.0

    # -- auth ---------------------------------------------------------------------------------------------
    def access_token(self) -> str:
        if self._access is None or time.time() > self._access_exp - 30:
            resp = self.http.post(f"{self.base_url}/api/token/refresh/", json={"refresh": self.pat}, timeout=30)
            if resp.status_code != 200:
                raise HarnessError(f"token refresh failed: HTTP {resp.status_code} {resp.text[:300]}")
            self._access = resp.json()["access"]
            self._access_exp = _jwt_exp(self._access)
        return self._access

    def request(self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        """JSON answer of ``method path``; raises HarnessError naming the call when the status is unexpected."""
        kwargs.setdefault("timeout", self.timeout_s)
        headers = {"Authorization": f"Bearer {self.access_token()}", **kwargs.pop("headers", {})}
        resp = self.http.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)
        if resp.status_code not in expect:
            raise HarnessError(f"{method} {path} -> HTTP {resp.status_code}: {resp.text[:1500]}")
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    # -- projects, tasks ----------------------------------------------------------------------------------
    def create_project(self, title: str, label_config: str) -> dict:
        return self.request("POST", "/api/projects/", json={"title": title, "label_config": label_config})

    def upload_images(self, project_id: int, images: list[tuple[str, bytes]]) -> list[dict]:
        """Import image files (multipart upload): Label Studio stores them and serves them at /data/upload/...

        Returns the project's tasks created by this import, in upload order.
        """
        before = {t["id"] for t in self.tasks(project_id)}
        files = [(f"file{k}", (name, data, "image/png")) for k, (name, data) in enumerate(images)]
        info = self.request("POST", f"/api/projects/{project_id}/import", files=files)
        if info.get("task_count") != len(images):
            raise HarnessError(f"import of {len(images)} image(s) created {info.get('task_count')} task(s): {info}")
        return [t for t in self.tasks(project_id) if t["id"] not in before]

    def tasks(self, project_id: int) -> list[dict]:
        out, page = [], 1
        while True:
            ans = self.request("GET", "/api/tasks/", params={"project": project_id, "page": page, "page_size": 100,
                                                            "fields": "all"}, expect=(200, 404))
            batch = ans.get("tasks", []) if isinstance(ans, dict) else []
            out.extend(batch)
            if len(batch) < 100:
                return sorted(out, key=lambda t: t["id"])
            page += 1

    def task(self, task_id: int) -> dict:
        return self.request("GET", f"/api/tasks/{task_id}/")

    def create_draft(self, task_id: int, result: list[dict]) -> dict:
        return self.request("POST", f"/api/tasks/{task_id}/drafts", json={"result": result, "lead_time": 1.0})

    def drafts(self, task_id: int) -> list[dict]:
        return self.request("GET", f"/api/tasks/{task_id}/drafts")

    def create_annotation(self, task_id: int, result: list[dict]) -> dict:
        return self.request("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result, "lead_time": 1.0})

    def annotations(self, task_id: int) -> list[dict]:
        return self.request("GET", f"/api/tasks/{task_id}/annotations/")

    def predictions(self, task_id: int) -> list[dict]:
        return self.request("GET", "/api/predictions/", params={"task": task_id})

    # -- ML backend -----------------------------------------------------------------------------------------
    def connect_ml_backend(self, project_id: int, url: str, title: str = "MaskInversion",
                           interactive: bool = True, basic_auth: tuple[str, str] | None = None) -> dict:
        """POST /api/ml/: Label Studio checks the backend's /health and calls its /setup before saving it.
        ``basic_auth``: the model's *Basic Auth* settings (user, password), sent on every ML API call."""
        body: dict[str, Any] = {"url": url, "project": project_id, "title": title, "is_interactive": interactive}
        if basic_auth is not None:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
        return self.request("POST", "/api/ml/", json=body)

    def interactive_annotating(self, ml_backend_id: int, task_id: int, regions: list[dict]) -> dict:
        """What the labelling UI sends when a region is drawn with auto-annotation on: ``{task, context: {result}}``.

        Label Studio forwards it to the backend's /predict and answers ``{"data": <first prediction>}`` or
        ``{"errors": [...]}`` (HTTP 200 in both cases).
        """
        return self.request("POST", f"/api/ml/{ml_backend_id}/interactive-annotating",
                            json={"task": task_id, "context": {"result": regions}})

    def retrieve_predictions(self, project_id: int, task_ids: list[int] | None = None) -> dict:
        """Data Manager action "Retrieve Predictions" (``retrieve_tasks_predictions``), run synchronously."""
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
        return self.request("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions",
                                                                "project": project_id},
                            json={"selectedItems": selected})


# --------------------------------------------------------------------------------------------------------------
# the ML backend
# --------------------------------------------------------------------------------------------------------------
def backend_bin() -> Path:
    exe = Path(os.environ.get("MASKINV_BACKEND_BIN", Path(sys.executable).parent / "maskinv-backend"))
    if not exe.exists():
        raise HarnessError(f"the backend console script is not at {exe}: `pip install -e .[all]` in the project's venv")
    return exe


@dataclass
class BackendServer:
    """``maskinv-backend`` on 127.0.0.1 (embedded mode unless ``env`` sets REDIS_URL)."""

    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S, wait_ready: bool = True) -> "BackendServer":
        self.port = self.port or free_port()
        env = _base_env()
        env.update({"MASKINV_HOST": "127.0.0.1", "MASKINV_PORT": str(self.port), "PYTHONUNBUFFERED": "1",
                    # its own example store beside its log, never the repository's ./maskinv-data
                    "MASKINV_DATA_DIR": str(self.log_path.parent / f"maskinv-data-{self.port}")})
        env.update(self.env)
        self.process = ManagedProcess("maskinv-backend", [str(backend_bin())], env, self.log_path).start()
        try:
            self.process.wait_http(f"{self.url}/health", timeout_s,
                                   ok=lambda r: r.status_code == 200 and (not wait_ready or _ready(r)))
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def _ready(resp: requests.Response) -> bool:
    """The backend's /health says ``"ready": true`` (model loaded / a worker serves the queue).

    Raises HarnessError at once when it reports that the model failed to load.
    """
    try:
        body = resp.json()
    except ValueError:
        return False
    if isinstance(body, dict) and body.get("model_error"):
        raise HarnessError(f"the backend cannot load its model: {body['model_error'][:2000]}")
    return isinstance(body, dict) and bool(body.get("ready", True))


@dataclass
class WorkerProcess:
    """One RQ worker (``python -m worker``) for queue mode."""

    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: ManagedProcess | None = None

    def start(self) -> "WorkerProcess":
        env = _base_env()
        env.update({"PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        self.process = ManagedProcess("worker", [sys.executable, "-m", "worker"], env, self.log_path).start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


if __name__ == "__main__":
    # `python tests/e2e/ls_harness.py prepare-db`: make the cached migrated database now (scripts/label_studio_env.sh)
    if sys.argv[1:] != ["prepare-db"]:
        sys.exit("usage: ls_harness.py prepare-db")
    start = time.monotonic()
    print(f"migrated Label Studio database: {migrated_database()} ({time.monotonic() - start:.0f}s)")
