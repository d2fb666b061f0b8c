"""Label Studio and the ML backend started as README.md documents, plus what the browser tests need around them.

* Label Studio: ``.venv-ls/bin/label-studio start`` with README.md's two variables (``ML_BLOCK_LOCAL_IP=false
  SSRF_PROTECTION_ENABLED=false``) and nothing else of its configuration; only where (a fresh
  ``LABEL_STUDIO_BASE_DATA_DIR`` holding a copy of the cached migrated database) and the port differ.
* The backend: ``bash scripts/run.sh`` with README.md's offline-demo variables (the shipped tiny scene model),
  ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY`` and ``MASKINV_URL_SECRET``, on a free port; Label Studio gets
  the model URL ``http://.../<secret>`` as README.md's step 3 says.
* :class:`RecordingProxy`: Label Studio is connected to the backend through it, so the tests (and
  docs/browser.md) can show the exact ``/predict`` payloads Label Studio sends.

Process handling, the login session and the personal access token come from ``tests/e2e/ls_harness.py``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import secrets
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests

from ls_harness import (REPO_ROOT, START_TIMEOUT_S, LabelStudioClient, LabelStudioServer, ManagedProcess, _base_env,
                        _ready, free_port, label_studio_bin, migrated_database)

CHROMIUM = Path("/usr/bin/chromium")
#: without the background-networking flags Chromium's own connections are refused on a closed network
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: README.md, "Offline demo"
DEMO_ENV = {"MASKINV_MODEL": "maskinv-scene-tiny",
            "MASKINV_PRETRAINED": "assets/tiny_scene_clip/maskinv-scene-tiny.safetensors",
            "MASKINV_SIZE": "112", "MASKINV_CAPTIONER": "assets/tiny_clipcap", "MASKINV_DEVICE": "cpu"}
#: docs/proposals.md: the setting a curator proposes regions with on the demo model (224 px, masks snapped to
#: superpixels: the setting the objectness is fitted and measured at)
CURATING_ENV = {"MASKINV_SIZE": "224", "MASKINV_PROPOSAL_REFINE": "1"}
#: README.md, "Without Docker": Label Studio 1.23 refuses a backend on a local address without these two
README_LS_ENV = {"ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false"}
REGION_TAGS = ("RectangleLabels", "PolygonLabels", "BrushLabels")


def until(what: str, probe: Callable[[], Any], timeout_s: float, every_s: float = 1.0) -> Any:
    """``probe()``'s first truthy value, asked every ``every_s`` seconds; AssertionError naming ``what`` after
    ``timeout_s`` (a safety net against a hang, not a speed check)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"gave up waiting for {what}")


#: how long a page may take to reach a state on a slow, shared CPU (never sleep-and-assert)
PAGE_TIMEOUT_MS = 120_000


def log_in(page: Any, stack: "Stack", timeout_ms: int = PAGE_TIMEOUT_MS) -> None:
    """Fill Label Studio's login form and click *Log in*. On a loaded host the page can re-render the form between
    filling and clicking (it then comes back empty): like a person, fill it again, up to three times."""
    for attempt in range(3):
        page.goto(f"{stack.ls_url}/user/login/", wait_until="networkidle")
        page.locator("#email").fill(stack.username)
        page.locator("#password").fill(stack.password)
        page.locator("button.login-button").click()
        try:
            page.wait_for_url(lambda url: "/user/login" not in url,
                              timeout=timeout_ms if attempt == 2 else timeout_ms // 4)
            return
        except Exception:  # noqa: BLE001 - Playwright's TimeoutError: still on the login page
            if attempt == 2:
                raise


def missing_requirement() -> str | None:
    """Why the browser tests cannot run here (``None`` when they can)."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[test]'; scripts/test.sh does it)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium; scripts/test.sh does it)"
    try:
        label_studio_bin()
    except RuntimeError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------------------------
class ReadmeLabelStudio(LabelStudioServer):
    """Label Studio started with README.md's environment (not ls_harness's hardened one)."""

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "ReadmeLabelStudio":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        db = self.data_dir / "label_studio.sqlite3"  # Label Studio's default SQLite file in its data dir
        if not db.exists():
            shutil.copyfile(migrated_database(), db)  # the same schema `start` would migrate, minutes sooner
        self.port = self.port or free_port()
        env = dict(_base_env(), LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir), **README_LS_ENV)
        argv = [str(label_studio_bin()), "start", "--no-browser", "--internal-host", "127.0.0.1",
                "--port", str(self.port), "--username", self.username, "--password", self.password]
        self.process = ManagedProcess("Label Studio", argv, env, self.data_dir / "label_studio.log",
                                      cwd=self.data_dir).start()
        try:
            self.process.wait_http(f"{self.url}/health", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self


@dataclass
class DemoBackend:
    """``bash scripts/run.sh`` with the offline demo's variables, pointed at Label Studio."""

    log_path: Path
    ls_url: str
    token: str
    port: int = 0
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    process: ManagedProcess | None = None
    #: variables on top of the demo's (e.g. :data:`CURATING_ENV`)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The backend's root (``/health`` answers here); the model URL is ``url + "/" + secret``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "DemoBackend":
        self.port = self.port or free_port()
        env = dict(_base_env(), **{**DEMO_ENV, **self.extra_env}, LABEL_STUDIO_URL=self.ls_url,
                   LABEL_STUDIO_API_KEY=self.token,
                   MASKINV_URL_SECRET=self.secret, MASKINV_HOST="127.0.0.1", MASKINV_PORT=str(self.port),
                   MASKINV_DATA_DIR=str(self.log_path.parent / "maskinv-data"))  # not the repository's
        self.process = ManagedProcess("maskinv-backend (scripts/run.sh)", ["bash", "scripts/run.sh"], env,
                                      self.log_path, cwd=REPO_ROOT).start()
        try:
            self.process.wait_http(f"{self.url}/health", timeout_s, ok=lambda r: r.status_code == 200 and _ready(r))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


# --------------------------------------------------------------------------------------------------------------
# the recording proxy between Label Studio and the backend
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RecordingProxy:
    """Forwards every request to ``target`` unchanged and keeps the JSON bodies of ``POST /predict``."""

    target: str
    predicts: list[dict] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "RecordingProxy":
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _handler(proxy: RecordingProxy) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "POST" and self.path.split("?")[0].endswith("/predict"):
                try:
                    proxy.predicts.append(json.loads(body))
                except ValueError:
                    proxy.predicts.append({"unparsable": body[:200].decode(errors="replace")})
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            resp = requests.request(self.command, proxy.target + self.path, data=body, headers=headers,
                                    timeout=600)
            self.send_response(resp.status_code)
            self.send_header("Content-Type", resp.headers.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(resp.content)))
            self.end_headers()
            self.wfile.write(resp.content)

        do_GET = do_POST = do_PUT = do_DELETE = _forward  # noqa: N815

        def log_message(self, *args: object) -> None:  # quiet
            pass

    return Forward


# --------------------------------------------------------------------------------------------------------------
# scenes and label configs
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneTask:
    """One imported scene: PNG bytes, its object masks ``[H, W]`` (bool) and their labels."""

    png: bytes
    masks: tuple[np.ndarray, ...]
    labels: tuple[str, ...]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        h, w = self.masks[0].shape
        return w, h

    def box(self, k: int) -> tuple[int, int, int, int]:
        """Object ``k``'s bounding box in image pixels: (x0, y0, x1, y1), x1/y1 exclusive."""
        ys, xs = np.nonzero(self.masks[k])
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def scenes(indices: tuple[int, ...], size: int = 448) -> tuple[list[SceneTask], list[str]]:
    """Test-split scenes of the scene world (``training/scene_world.py``) and the world's vocabulary."""
    from training.scene_world import SceneWorld

    world = SceneWorld(seed=0, image_size=size, min_objects=3, max_objects=3)
    out = []
    for index in indices:
        sc = world.scene(index, split="test")
        buf = io.BytesIO()
        sc.image.save(buf, "PNG")
        out.append(SceneTask(buf.getvalue(), tuple(o.mask for o in sc.objects), tuple(o.label for o in sc.objects)))
    return out, list(world.class_names)


def with_vocabulary(xml: str, labels: list[str]) -> str:
    """The label config with its region control's ``<Label>`` list replaced by ``labels`` (README step 1)."""
    root = ET.fromstring(xml)
    control = next(e for e in root.iter() if e.tag in REGION_TAGS)
    background = [lab.get("background") for lab in control.iter("Label")]
    for child in [c for c in control if c.tag == "Label"]:
        control.remove(child)
    for k, label in enumerate(labels):
        ET.SubElement(control, "Label", {"value": label, "background": background[k % len(background)] or "#888"})
    return ET.tostring(root, encoding="unicode")


SHOTS = Path(__file__).resolve().parent / "screenshots"


@dataclass
class Project:
    """A Label Studio project made from ``label_config/<name>.xml`` with the scenes imported as tasks."""

    name: str
    id: int
    ml_backend_id: int
    task_ids: list[int]
    scenes: list[SceneTask]


@dataclass
class Stack:
    """Everything the browser tests talk to."""

    ls_url: str
    username: str
    password: str
    client: LabelStudioClient
    proxy: RecordingProxy
    projects: dict[str, Project]
    vocabulary: list[str]
    started_at: float  # time.monotonic() when the session fixture began (clean start)
    timings: dict[str, float] = field(default_factory=dict)

    def record(self, key: str, value: object) -> None:
        """Keep a finding in ``screenshots/findings.json`` (payloads, timings) for docs/browser.md."""
        path = SHOTS / "findings.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = value
        SHOTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=str))
