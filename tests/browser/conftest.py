"""Browser fixtures: Label Studio + the demo backend (one start per session), headless Chromium, one page per test.

The session fixture ``stack`` starts Label Studio and the backend the way README.md documents them
(``browser_harness``), creates the user, one project per shipped label config (its vocabulary set to the scene
world's colour-shape names, README step 1), connects the backend through Label Studio's API (via a recording
proxy that keeps the ``/predict`` payloads) and imports three scenes into each project. Screenshots and page
dumps go to ``tests/browser/screenshots/`` (git-ignored).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from browser_harness import (CHROMIUM, CHROMIUM_ARGS, REPO_ROOT, SHOTS, DemoBackend, Project, ReadmeLabelStudio,
                             RecordingProxy, SceneTask, Stack, missing_requirement, scenes, with_vocabulary)
from ls_harness import HarnessError, LabelStudioClient

SCENE_INDICES = (3, 4, 5)
CONFIGS = ("rectangle", "brush", "polygon")
_processes: list = []


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("browser")
    ls_server = ReadmeLabelStudio(tmp / "label-studio")
    backend = proxy = None
    try:
        ls_server.start()
        _processes.append(ls_server.process)
        token = ls_server.personal_access_token()
        backend = DemoBackend(tmp / "backend.log", ls_server.url, token).start()
        _processes.append(backend.process)
        proxy = RecordingProxy(backend.url).start()
        client = LabelStudioClient(ls_server.url, token)
        tasks, vocabulary = scenes(SCENE_INDICES)
        model_url = f"{proxy.url}/{backend.secret}"  # README step 3: the model URL carries MASKINV_URL_SECRET
        projects = {name: _project(client, name, vocabulary, tasks, model_url) for name in CONFIGS}
    except HarnessError as exc:
        _stop(ls_server, backend, proxy)
        pytest.fail(str(exc), pytrace=False)
    yield Stack(ls_server.url, ls_server.username, ls_server.password, client, proxy, projects, vocabulary,
                started)
    _stop(ls_server, backend, proxy)


def _project(client: LabelStudioClient, name: str, vocabulary: list[str], tasks: list[SceneTask],
             backend_url: str) -> Project:
    xml = with_vocabulary((REPO_ROOT / "label_config" / f"{name}.xml").read_text(), vocabulary)
    project = client.create_project(f"MaskInversion {name}", xml)
    # Settings -> Annotation -> "Use predictions to prelabel tasks" off: the task opens without the backend's
    # proposed regions, so the annotator draws on a clean image (docs/browser.md says what the default shows)
    client.request("PATCH", f"/api/projects/{project['id']}/", json={"show_collab_predictions": False})
    ml = _connect(client, project["id"], backend_url)
    created = client.upload_images(project["id"], [(f"scene{k}.png", t.png) for k, t in enumerate(tasks)])
    return Project(name, project["id"], ml["id"], [t["id"] for t in created], tasks)


def _connect(client: LabelStudioClient, project_id: int, backend_url: str, tries: int = 3) -> dict:
    """README step 3 (*Connect model*). Label Studio gives the backend's ``/setup`` 3 s; on a busy host the first
    answer can take longer, and a person would click *Validate and Save* again: so does this, up to ``tries``."""
    for k in range(tries):
        try:
            return client.connect_ml_backend(project_id, backend_url, interactive=True)
        except HarnessError as exc:
            if k == tries - 1 or "timed out" not in str(exc):
                raise
    raise AssertionError("unreachable")


def _stop(*servers: object) -> None:
    for server in servers:
        if server is not None:
            server.stop()


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """Debian's Chromium driven by Playwright (no browser download)."""
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: object, request: pytest.FixtureRequest) -> Iterator[object]:
    """A fresh browser context (no cookies: the test logs in) and page, 1440 x 1000; a screenshot and the DOM
    are saved when the test fails."""
    context = chromium.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
    context.set_default_timeout(60_000)
    pg = context.new_page()
    yield pg
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        SHOTS.mkdir(parents=True, exist_ok=True)
        name = request.node.name.replace("/", "_")
        try:
            pg.screenshot(path=str(SHOTS / f"{name}-failure.png"))
            (SHOTS / f"{name}-failure.html").write_text(pg.content())
        except Exception:  # noqa: BLE001 - best effort: the page may be gone
            pass
    context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    if report.failed and "tests/browser/" in item.nodeid.replace("\\", "/"):
        for proc in _processes:
            if proc is not None:
                report.sections.append((f"{proc.name} log (tail)", proc.log_tail(60)))

