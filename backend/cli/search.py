"""``maskinv-search``: search a project's regions from the command line, and index existing projects.

    maskinv-search query --project 3 --text "rusty valve" [-k 20] [--json]
    maskinv-search query --project 3 --project 7 --label valve --sources suggested proposed --max-score 0.5
    maskinv-search query --project 3 --example 3/12/a1b2 --example 3/15/c3d4     # project/task/region
    maskinv-search query --project 3 --coverage -k 50      # regions least like anything labelled
    maskinv-search query --project 3 --text valve --to-label-studio  # hits as prediction set search:<digest>
    maskinv-search backfill 3 7 [--force] [--no-progress]  # index projects 3 and 7 from Label Studio

It uses the backend's settings (``MASKINV_SEARCH_STORE``, ``MASKINV_DATA_DIR``, the model variables, and
``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` for ``backfill``): with REDIS_URL set, text embeddings and
backfill jobs go to the running workers, else the model runs in this process. ``query`` answers what
``POST /search`` answers, with the same caps (docs/security.md); ``backfill`` is resumable (tasks indexed under
the current model are skipped unless ``--force``).

Exit status: 0 done, 1 some tasks failed (backfill), 2 bad arguments, settings or query, 3 Label Studio or the
queue cannot be used.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from backend.dispatch import DispatchError
from backend.learning.learner import LearningError, project_id
from backend.search.api import LabelStudioAPIError, ModelNotReady, SearchUnavailable, answer
from backend.search.backfill import MODEL_LOAD_S, BackfillReport, backfill_project
from backend.search.records import SOURCES, SearchInputError
from backend.service import Service
from backend.settings import Settings, SettingsError


def _example(text: str) -> dict[str, Any]:
    parts = text.split("/", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"--example {text!r}: expected project/task/region, e.g. 3/12/a1b2")
    return {"project": parts[0], "task": int(parts[1]), "region": parts[2]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="maskinv-search", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("query", help="search regions")
    q.add_argument("--project", action="append", required=True, help="Label Studio project id (repeatable)")
    kind = q.add_mutually_exclusive_group(required=True)
    kind.add_argument("--text", help="what the regions show, e.g. 'rusty valve'")
    kind.add_argument("--label", help="a label: the mean of its accepted examples")
    kind.add_argument("--example", action="append", type=_example, help="project/task/region (repeatable)")
    kind.add_argument("--coverage", action="store_true", help="regions least like anything labelled")
    q.add_argument("-k", type=int, default=20, help="hits (default 20)")
    q.add_argument("--labels", nargs="+", help="only regions with these labels")
    q.add_argument("--sources", nargs="+", choices=SOURCES, help="only regions of these sources")
    q.add_argument("--min-score", type=float)
    q.add_argument("--max-score", type=float)
    q.add_argument("--json", action="store_true", help="print the answer as JSON (default: a table)")
    q.add_argument("--to-label-studio", action="store_true",
                   help="also write the hits as prediction set search:<digest> of each project in Label Studio")
    b = sub.add_parser("backfill", help="index projects' annotations and predictions from Label Studio")
    b.add_argument("projects", nargs="+", help="Label Studio project ids")
    b.add_argument("--force", action="store_true", help="re-index tasks already in the index")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def query_body(a: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"projects": a.project, "k": a.k, "to_label_studio": a.to_label_studio}
    if a.text is not None:
        body["text"] = a.text
    elif a.label is not None:
        body["label"] = a.label
    elif a.example:
        body["examples"] = a.example
    else:
        body["coverage"] = True
    for key, value in (("labels", a.labels), ("sources", a.sources), ("min_score", a.min_score),
                       ("max_score", a.max_score)):
        if value is not None:
            body[key] = value
    return body


def table(doc: dict[str, Any]) -> str:
    """The hits as an aligned text table."""
    rows = [("#", "similarity", "project", "task", "region", "label", "score", "source")]
    for i, h in enumerate(doc["hits"], 1):
        rows.append((str(i), f"{h['similarity']:.4f}", str(h["project"]), str(h["task"]), str(h["region"])[:24],
                     str(h["label"])[:24], f"{h['score']:.3f}", h["source"]))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return f"query {doc['query']} ({doc['kind']}, model {doc['model']}): {len(doc['hits'])} hit(s)\n" + "\n".join(lines)


def _progress(enabled: bool, project: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(unit="task", desc=f"project {project}", dynamic_ncols=True, file=sys.stderr)

    def update(rep: BackfillReport) -> None:
        bar.update(rep.tasks - bar.n)
        bar.set_postfix(indexed=rep.indexed_tasks, skipped=rep.skipped_tasks, regions=rep.human + rep.predicted,
                        failed=len(rep.failed))
    return update


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"maskinv-search: {exc}", file=sys.stderr)
        return 2
    service = Service(settings)
    if service.search_index is None:
        print("maskinv-search: region search is off (MASKINV_SEARCH_STORE=off)", file=sys.stderr)
        return 2
    try:
        if a.command == "query":
            doc = answer(service, query_body(a), wait_s=MODEL_LOAD_S)
            print(json.dumps(doc, indent=1) if a.json else table(doc))
            for written in doc.get("label_studio") or []:
                print(f"Label Studio project {written['project']}: {written['regions']} region(s) in "
                      f"{written['tasks']} task(s) as {written['model_version']} ({written['already']} already "
                      f"there, {len(written['missing'])} missing)", file=sys.stderr)
            return 0
        status = 0
        client = service.learner._client()
        for raw in a.projects:
            pid = project_id(raw)
            rep = backfill_project(service, service.search_index, pid, client, force=a.force,
                                   progress=_progress(not a.no_progress, pid))
            print(json.dumps(rep.to_dict()))
            status = status or (1 if rep.failed else 0)
        return status
    except (LearningError, DispatchError, LabelStudioAPIError, ModelNotReady) as exc:  # LearningError: a ValueError
        print(f"maskinv-search: {exc}", file=sys.stderr)
        return 3
    except (SearchInputError, SearchUnavailable, ValueError) as exc:
        print(f"maskinv-search: {exc}", file=sys.stderr)
        return 2
    finally:
        service.search_index.close()


if __name__ == "__main__":
    sys.exit(main())
