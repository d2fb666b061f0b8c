"""First suggestion after ``/setup``: latency of the first ``/predict`` when Label Studio has just connected.

Each run is a fresh embedded-mode backend process (Flask test client, the model loaded at start-up): it waits for the
model, sends ``/setup`` with the shipped rectangle config (10 labels), waits ``--gap`` seconds (an annotator drawing
the first box), then times one interactive ``/predict`` of one rectangle. Runs ``--runs`` times per tree:

* ``before``: the tree of ``--before`` (a git revision, exported with ``git archive``): prototypes built inside the
  first ``/predict``, text encoded over CLIP's full 77-token context;
* ``after``: this tree: ``/setup`` has the worker build the prototypes in the background (``prepare_labels``) and
  the text encoder skips the padding; ``after, no gap`` sends the ``/predict`` right after ``/setup``.

    nice python benchmarks/bench_first_suggestion.py --before <rev>      # ViT-B-16, random weights, CPU

Writes benchmarks/results/first_suggestion.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def child(gap_s: float) -> dict:
    """One measurement in this process (the backend and worker imported from PYTHONPATH's tree)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from backend.http.app import create_app
    from backend.settings import Settings

    t0 = time.perf_counter()
    app = create_app(Settings.from_env(os.environ))
    client = app.test_client()
    while not client.get("/health").get_json().get("model", {}) and time.perf_counter() - t0 < 600:
        time.sleep(0.2)
    ready_s = time.perf_counter() - t0
    xml = (ROOT / "label_config" / "rectangle.xml").read_text()
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, "PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    drawn = {"id": "r1", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 640,
             "original_height": 480, "image_rotation": 0,
             "value": {"x": 20.0, "y": 20.0, "width": 40.0, "height": 50.0, "rotation": 0, "rectanglelabels": []}}
    resp = client.post("/setup", json={"project": "1", "schema": xml})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    time.sleep(gap_s)
    t1 = time.perf_counter()
    body = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": xml, "project": "1.1700000000",
            "params": {"login": None, "password": None, "context": {"result": [drawn]}}}
    resp = client.post("/predict", json=body)
    first_s = time.perf_counter() - t1
    assert resp.status_code == 200, resp.get_data(as_text=True)
    labelled = "rectanglelabels" in json.dumps(resp.get_json())
    return {"model_ready_s": ready_s, "first_predict_s": first_s, "labelled": labelled}


def run_tree(tree: Path, gap_s: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "MASKINV_MODEL": "ViT-B-16", "MASKINV_PRETRAINED": "none",
           "MASKINV_DEVICE": "cpu", "MASKINV_SIZE": "224", "MASKINV_STEPS": "10", "MASKINV_WARMUP": "1",
           "MASKINV_LOG_LEVEL": "WARNING", "MASKINV_TIMEOUT": "900"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--gap", str(gap_s)], cwd=tree,
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="git revision of the 'before' tree (omit to measure this tree only)")
    p.add_argument("--gap", type=float, default=10.0, help="seconds between /setup and the first /predict")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.gap)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="maskinv-before-") as tmp:
        trees = [("after", ROOT, a.gap), ("after, no gap", ROOT, 0.0)]
        if a.before:
            archive = subprocess.run(["git", "archive", a.before], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees.insert(0, ("before", Path(tmp), a.gap))
        for _ in range(a.runs):
            for name, tree, gap in trees:
                r = run_tree(tree, gap)
                rows.append({"tree": name, "gap_s": gap, **r})
                print(name, r, flush=True)
    meta = {"model": "ViT-B-16 (random weights, MASKINV_PRETRAINED=none)", "size": 224, "steps": 10,
            "labels": 10, "templates": 10, "before": a.before,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "first_suggestion.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    lines = ["# First suggestion after /setup", "",
             f"{meta['model']}, S = 224, K = 10, the shipped rectangle config ({meta['labels']} labels x "
             f"{meta['templates']} templates), one box, embedded mode, CPU ({meta['machine']}); `/predict` sent "
             f"{a.gap:g} s after `/setup` (\"no gap\": at once). Before: revision `{a.before}`.", "",
             "| tree | gap (s) | model ready (s) | first /predict (s) | labelled |", "|---|---|---|---|---|"]
    lines += [f"| {r['tree']} | {r['gap_s']:g} | {r['model_ready_s']:.1f} | {r['first_predict_s']:.2f} | "
              f"{'yes' if r['labelled'] else 'no'} |" for r in rows]
    (RESULTS / "first_suggestion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
