"""``maskinv-annotate``: label every region of a whole Label Studio project and write the predictions through
Label Studio's API (backend.runs.project_run), with a progress bar and a summary.

    maskinv-annotate --url http://localhost:8080 --token $LABEL_STUDIO_API_KEY --project 3 [--view 12 |
                     --tasks 1,2,5-9] [--workers 4] [--retry-failed] [--dry-run] [--proposals auto|on|off]

Tasks without any region (no annotation, no prediction with a result) get regions proposed by the model
(backend.predict.propose) unless ``--proposals off``, the label config's ``maskinvProposals="false"`` or
MASKINV_PROPOSALS=off says otherwise (``--proposals auto``, the default, leaves it to the config, then to
MASKINV_PROPOSALS; ``on``/``off`` overrides both).

It uses the backend's own settings (the same MASKINV_* environment as ``maskinv-backend``, so the model version it
writes is the one ``/setup`` answers for the project): with REDIS_URL set it sends the jobs to the RQ queue served
by ``maskinv-worker`` processes, else it runs the model in this process. Either way its run shows in ``GET /runs``
of a backend with the same settings (Redis, or ``runs.sqlite3`` under MASKINV_DATA_DIR). Re-
running it is safe: tasks that hold a prediction of the current model version are skipped; a killed run loses only
the tasks it had in flight. Tasks that failed for a permanent reason (unusable image, bad geometry) are remembered
in a small state file (``--state-dir``) and skipped by later runs unless ``--retry-failed``; transient failures
(timeouts, no worker) are always retried.

With a region index (``MASKINV_SEARCH_STORE``, as the backend's) every labelled or proposed region is indexed
for search as the run labels it (backend.predict.live); the command waits for the last writes before it exits.

Only tasks of ``--project`` are written: ``--tasks`` ids are re-read from Label Studio one by one and a task of
another project is reported as failed (kind ``project``), never written.

Exit status: 0 all tasks labelled or skipped, 1 some tasks failed, 2 bad arguments or settings, 3 Label
Studio or the queue cannot be used, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from worker.protocol import sha256_hex

#: failure kinds remembered in the state file (skipped by later runs unless --retry-failed)
PERMANENT_KINDS = frozenset({"source", "region", "rejected", "limit"})
#: seconds the command waits at its end for the labelled regions to reach the region index (MASKINV_SEARCH_STORE)
INDEX_FLUSH_S = 120.0

log = logging.getLogger("maskinv-annotate")


def parse_task_ids(text: str) -> list[int]:
    """``"1,2,5-9"`` -> ``[1, 2, 5, 6, 7, 8, 9]`` (order kept, duplicates dropped); ValueError names the part."""
    out: dict[int, None] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"--tasks: {part!r} is not a task id or a range like 5-9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi - lo > 1_000_000:
            raise ValueError(f"--tasks: bad range {part!r}")
        for t in range(lo, hi + 1):
            out[t] = None
    if not out:
        raise ValueError("--tasks: no task id given")
    return list(out)


class FailureState:
    """Tasks that failed permanently, per (Label Studio, project, model version): one JSON line per failure."""

    def __init__(self, directory: Path, url: str, project: int, model_version: str):
        digest = sha256_hex(f"{url}\n{project}\n{model_version}".encode())[:16]
        self.path = Path(directory) / f"project-{project}-{digest}.jsonl"

    def load(self) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and "task" in rec:
                if rec.get("ok"):
                    out.pop(str(rec["task"]), None)
                else:
                    out[str(rec["task"])] = str(rec.get("reason") or "")
        return out

    def record(self, task_id: Any, reason: str | None, ok: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"task": task_id, "ok": ok, "reason": (reason or "")[:500]}) + "\n")


def default_state_dir() -> Path:
    raw = os.environ.get("MASKINV_RUN_STATE_DIR", "").strip()
    return Path(raw) if raw else Path.home() / ".cache" / "maskinv-annotate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskinv-annotate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"),
                   help="Label Studio URL [env LABEL_STUDIO_URL]")
    p.add_argument("--token", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                   help="personal access token or legacy API token [env LABEL_STUDIO_API_KEY]")
    p.add_argument("--project", type=int, required=True, help="project id")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tasks", help="only these task ids: 1,2,5-9")
    sel.add_argument("--view", type=int, help="only the tasks of this Data Manager view (tab) id")
    p.add_argument("--workers", type=int, default=None,
                   help="tasks in flight at once (images fetched, jobs queued or running) [default: twice the "
                        "number of live queue workers, or 2 in embedded mode]")
    p.add_argument("--retry-failed", action="store_true",
                   help="also retry tasks that failed permanently in an earlier run")
    p.add_argument("--dry-run", action="store_true", help="list what would be labelled; run and write nothing")
    p.add_argument("--proposals", choices=("auto", "on", "off"), default="auto",
                   help="regions proposed for tasks without any region: auto = as the label config's "
                        "maskinvProposals says, else MASKINV_PROPOSALS (default auto: on); on/off override both "
                        "[auto]")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where permanent failures are remembered [env MASKINV_RUN_STATE_DIR, default "
                        "~/.cache/maskinv-annotate]")
    p.add_argument("--summary-json", type=Path, default=None, help="also write the summary as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=(os.environ.get("MASKINV_LOG_LEVEL") or "WARNING").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    err = lambda msg: print(f"maskinv-annotate: {msg}", file=sys.stderr)  # noqa: E731
    if not args.url or not args.url.startswith(("http://", "https://")):
        err("--url (or LABEL_STUDIO_URL) must be Label Studio's http(s) URL")
        return 2
    if not args.token:
        err("--token (or LABEL_STUDIO_API_KEY) is required: a personal access token from Account & Settings")
        return 2
    if args.workers is not None and not 1 <= args.workers <= 256:
        err("--workers must be in [1, 256]")
        return 2
    try:
        task_ids = parse_task_ids(args.tasks) if args.tasks else None
    except ValueError as exc:
        err(str(exc))
        return 2

    from backend.settings import Settings, SettingsError

    env = dict(os.environ, LABEL_STUDIO_URL=args.url.rstrip("/"), LABEL_STUDIO_API_KEY=args.token,
               MASKINV_WARMUP="0")
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        err(str(exc))
        return 2
    try:
        return _run(args, settings, task_ids)
    except KeyboardInterrupt:
        err("interrupted: tasks in flight are lost; run again to finish the rest")
        return 130


class CliFailure(Exception):
    """Ends the command with ``code`` after printing ``message``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _err(msg: str) -> None:
    print(f"maskinv-annotate: {msg}", file=sys.stderr)


def _run(args: argparse.Namespace, settings: Any, task_ids: list[int] | None) -> int:
    """Open the project, pick the run store and the tasks, run, and report; the exit status (module docstring)."""
    from backend.labelstudio.api import LabelStudioAPIError
    from backend.runs.project_run import run_version

    try:
        api, service, cfg = _open_project(args, settings)
        store, workers = _run_backend(service, settings, args.workers)
        version = run_version(service, cfg, str(args.project))
        state = FailureState(args.state_dir or default_state_dir(), settings.label_studio_url, args.project, version)
        failed_before = state.load()
        total, tasks = _task_source(args, api, task_ids)
        run = _project_run(args, service, cfg, api, store, version, workers, state, failed_before)
    except CliFailure as exc:
        _err(str(exc))
        return exc.code
    print(f"maskinv-annotate: run {run.run_id}: project {args.project}, model version {version}, "
          f"{service.dispatcher.mode} mode, {workers} task(s) in flight, proposals for tasks without regions "
          f"{'on' if run.proposing else 'off'}{', dry run' if args.dry_run else ''}", file=sys.stderr)
    progress = _Progress(args, total, run)
    run.on_task = _task_reporter(args, state, failed_before, progress)
    interrupted = False
    try:
        summary = run.run(tasks, total=total)
    except KeyboardInterrupt:
        interrupted = True
        summary = run.summary
    except LabelStudioAPIError as exc:
        progress.close()
        _err(str(exc))
        return 3
    finally:
        _flush_index(service)
    progress.close()
    _report(args, summary, version, run.run_id, state)
    if summary.labelled and not args.dry_run and settings.select_version:
        _select_source(api, args.project, version)
    if interrupted:
        raise KeyboardInterrupt
    return 1 if summary.failed else 0


def _flush_index(service: Any) -> None:
    """Wait for the run's labelled regions to reach the region index (written in the background)."""
    index = getattr(service, "search_index", None)
    if index is not None and not index.flush(INDEX_FLUSH_S):
        _err(f"the region index did not take every labelled region within {INDEX_FLUSH_S:.0f} s; "
             "`maskinv-search backfill` indexes the rest")


def _select_source(api: Any, project: int, version: str) -> None:
    """Make ``version`` the project's prediction source, as the backend does after /setup
    (backend.runs.prediction_source), so the Data Manager's score column shows the written predictions."""
    from backend.labelstudio.api import LabelStudioAPIError
    from backend.runs.prediction_source import select_version

    if getattr(api, "client", None) is None:  # not label-studio-sdk's client (nothing to ask)
        return
    try:
        if select_version(api, int(project), version):
            print(f"maskinv-annotate: model version {version} is now project {project}'s prediction source",
                  file=sys.stderr)
    except LabelStudioAPIError as exc:
        _err(f"could not make {version} the project's prediction source: {exc}")


def _open_project(args: argparse.Namespace, settings: Any) -> tuple[Any, Any, Any]:
    """``(api, service, cfg)``: the Label Studio API, the backend service and the project's parsed label config."""
    from backend.labelstudio.api import LabelStudioAPI, LabelStudioAPIError
    from backend.labelstudio.label_config import LabelConfigError
    from backend.service import Service

    api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key)
    try:
        xml = api.label_config(args.project)
    except LabelStudioAPIError as exc:
        raise CliFailure(3, str(exc)) from None
    service = Service(settings)
    try:
        return api, service, service.config(xml)
    except LabelConfigError as exc:
        raise CliFailure(2, f"project {args.project}'s label config: {exc}") from None


def _run_backend(service: Any, settings: Any, workers: int | None) -> tuple[Any, int]:
    """The run store and the tasks in flight: embedded mode loads the model here (SQLite store under
    MASKINV_DATA_DIR, 2 tasks); queue mode needs live workers that serve one model (Redis store, 2 tasks per
    worker). Both stores are the ones ``GET /runs`` of a backend with the same settings reads."""
    from backend.runs.file_store import embedded_run_store
    from backend.runs.store import RedisRunStore

    if settings.embedded:
        print("maskinv-annotate: embedded mode (REDIS_URL unset): loading the model in this process ...",
              file=sys.stderr)
        try:
            service.dispatcher.warm_up().result()
        except Exception as exc:  # noqa: BLE001
            raise CliFailure(3, f"the model failed to load: {exc}") from None
        # SQLite under MASKINV_DATA_DIR: the embedded backend's GET /runs shows this run
        return embedded_run_store(settings.data_dir, settings.max_run_records), workers or 2
    registry = service.worker_registry()
    live = registry.live_models() if registry is not None else {}
    if not live:
        raise CliFailure(3, f"no maskinv-worker is serving queue {settings.queue!r} on {settings.redis_url_redacted}; "
                            "start one with `maskinv-worker`")
    if len({m.get('id') for m in live.values()}) != 1:
        raise CliFailure(3, f"the workers on queue {settings.queue!r} serve different models; the model version "
                            "would be ambiguous")
    store = RedisRunStore(service.queue_connection(), settings.redis_prefix, settings.job_timeout_s + 3600,
                          settings.max_run_records)
    store.trim()
    return store, workers or max(2, 2 * len(live))


def _task_source(args: argparse.Namespace, api: Any, task_ids: list[int] | None
                 ) -> tuple[int | None, Iterator[dict] | list[int]]:
    """``(total, tasks)``: the ``--tasks`` ids (each re-read by the run, written only when it is a task of
    ``--project``), else the project's tasks (``--view``) page by page."""
    from backend.labelstudio.api import LabelStudioAPIError

    if task_ids is not None:
        return len(task_ids), task_ids
    try:
        return api.list_tasks(args.project, view=args.view)
    except LabelStudioAPIError as exc:
        raise CliFailure(3, str(exc)) from None


def _project_run(args: argparse.Namespace, service: Any, cfg: Any, api: Any, store: Any, version: str, workers: int,
                 state: FailureState, failed_before: Any) -> Any:
    """The project run (backend.runs.project_run.ProjectRun) the arguments describe."""
    from backend.runs.project_run import ProjectRun
    from backend.service import PredictError

    try:
        return ProjectRun(service, cfg, api, store, model_version=version, kind="annotate", project=args.project,
                          workers=workers, dry_run=args.dry_run, retry_failed=args.retry_failed,
                          failed_before=failed_before,
                          proposals={"auto": None, "on": True, "off": False}[args.proposals])
    except PredictError as exc:
        raise CliFailure(2, f"project {args.project}: {exc.message}") from None


class _Progress:
    """The progress bar (tqdm on stderr) unless ``--no-progress``: tasks done, regions/s, the counts so far."""

    def __init__(self, args: argparse.Namespace, total: int | None, run: Any):
        self.run = run
        self.t0 = time.monotonic()
        self.bar = None
        if not args.no_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="task", desc=f"project {args.project}", dynamic_ncols=True,
                            mininterval=0.5, file=sys.stderr)

    def task_done(self) -> None:
        if self.bar is None:
            return
        s = self.run.summary
        self.bar.update(1)
        rate = s.regions / max(1e-6, time.monotonic() - self.t0)
        self.bar.set_postfix_str(f"{rate:.2f} regions/s, labelled {s.labelled}, skipped {s.skipped}, "
                                 f"failed {s.failed}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _task_reporter(args: argparse.Namespace, state: FailureState, failed_before: Any, progress: _Progress) -> Any:
    """The run's per-task callback: remember permanent failures (and tasks that now succeed), advance the bar."""
    def on_task(o: Any) -> None:
        if o.status == "failed" and o.kind in PERMANENT_KINDS and not args.dry_run:
            state.record(o.task_id, o.reason)
        elif o.status == "labelled" and str(o.task_id) in failed_before:
            state.record(o.task_id, None, ok=True)
        progress.task_done()
    return on_task


def _report(args: argparse.Namespace, summary: Any, version: str, run_id: str, state: FailureState) -> None:
    """The end-of-run summary on stderr, and ``--summary-json``."""
    print(format_summary(summary, args.dry_run, version, run_id), file=sys.stderr)
    if any(k in PERMANENT_KINDS for _, _, k in summary.failures.values()) and not args.dry_run:
        print(f"  (tasks that failed permanently are skipped by later runs unless --retry-failed; {state.path})",
              file=sys.stderr)
    if args.summary_json:
        args.summary_json.write_text(json.dumps({"run": run_id, "model_version": version, **summary.to_dict()},
                                                indent=2))


def format_summary(s: Any, dry_run: bool, version: str, run_id: str) -> str:
    """The end-of-run summary: labelled / skipped (by reason) / failed (by reason) / time."""
    rate = s.regions / s.seconds if s.seconds > 0 else 0.0
    skipped = ", ".join(f"{k.replace('_', ' ')}: {n}" for k, n in sorted(s.skipped_by.items()))
    lines = [f"maskinv-annotate: run {run_id} {'interrupted' if s.interrupted else 'finished'} in {s.seconds:.1f} s "
             f"(model version {version})"]
    if dry_run:
        n = s.skipped_by.get("dry_run", 0)
        lines.append(f"  dry run: {n} task(s) would be labelled ({s.regions} regions); nothing was written")
        if s.proposal_tasks:
            lines.append(f"  of them {s.proposal_tasks} task(s) without regions would get proposals")
    else:
        lines.append(f"  labelled: {s.labelled} task(s), {s.regions} region(s) ({rate:.2f} regions/s)")
        if s.proposal_tasks:
            lines.append(f"    of them {s.proposal_tasks} task(s) without regions, {s.proposed} proposed region(s)")
    lines.append(f"  skipped:  {s.skipped} task(s)" + (f" ({skipped})" if skipped else ""))
    lines.append(f"  failed:   {s.failed} task(s)")
    for reason, (count, ids, kind) in s.failures.items():
        more = " ..." if count > len(ids) else ""
        lines.append(f"    {count} x [{kind}] task(s) {', '.join(map(str, ids))}{more}: {reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
