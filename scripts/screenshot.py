"""Screenshot of Label Studio's labelling page with MaskInversion's suggested labels and captions.

Starts a throw-away Label Studio (``.venv-ls``, see scripts/label_studio_env.sh) and the ML backend, makes a
project from a shipped label config, uploads a scene, draws one region per object, asks Label Studio for the
interactive suggestions (the same call the labelling UI makes), accepts them as the annotation, then opens
the task in headless Chromium (Debian's ``chromium``, driven by Playwright) and saves a PNG.

Model: the trained tiny scene CLIP (``assets/tiny_scene_clip/maskinv-scene-tiny.safetensors``) with the
scene world's colour-shape vocabulary when that file exists, else the random-init test model with the
config's own vocabulary (labels are then arbitrary: the picture shows the plumbing, not accuracy).
``--model/--pretrained`` choose another one (e.g. ``--model ViT-B-16 --pretrained /path/to/openai.bin``).

    python scripts/screenshot.py                       # -> docs/screenshot_labelling.png
    python scripts/screenshot.py --config label_config/rectangle.xml --out docs/screenshot_rectangle.png

Needs: ``apt-get install chromium`` and ``pip install playwright`` (no browser download: the system
Chromium is used).
"""

from __future__ import annotations

import argparse
import io
import sys
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests" / "e2e")]

from ls_harness import BackendServer, LabelStudioClient, LabelStudioServer  # noqa: E402

SCENE_CHECKPOINT = REPO_ROOT / "assets" / "tiny_scene_clip" / "maskinv-scene-tiny.safetensors"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075", "#808080"]
REGION_TAGS = ("BrushLabels", "PolygonLabels", "RectangleLabels")


def with_vocabulary(xml: str, labels: list[str]) -> str:
    """The label config with its region control's ``<Label>`` children replaced by ``labels``."""
    root = ET.fromstring(xml)
    control = next(e for e in root.iter() if e.tag in REGION_TAGS)
    for child in list(control):
        if child.tag == "Label":
            control.remove(child)
    for k, label in enumerate(labels):
        ET.SubElement(control, "Label", {"value": label, "background": PALETTE[k % len(PALETTE)]})
    return ET.tostring(root, encoding="unicode")


def region_for_mask(control: ET.Element, image: str, mask: np.ndarray, region_id: str) -> dict:
    """A drawn, unlabelled region for a boolean mask ``[H, W]``: the mask itself (brush) or its outline box."""
    h, w = mask.shape
    tag = control.tag.lower()
    if tag == "brushlabels":
        from label_studio_sdk.converter.brush import mask2rle

        value = {"format": "rle", "rle": [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)]}
    else:
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        if tag == "rectanglelabels":
            value = {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                     "height": 100 * (y1 - y0) / h, "rotation": 0}
        else:
            value = {"points": [[100 * x / w, 100 * y / h] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))],
                     "closed": True}
    value[tag] = []
    return {"id": region_id, "from_name": control.get("name"), "to_name": image, "type": tag,
            "original_width": w, "original_height": h, "image_rotation": 0, "origin": "manual", "value": value}


def scene(index: int, size: int) -> tuple[bytes, list[np.ndarray], list[str], list[str]]:
    """PNG bytes, object masks ``[H, W]``, object labels and the world's vocabulary."""
    from training.scene_world import SceneWorld

    world = SceneWorld(seed=0, image_size=size, min_objects=3, max_objects=4)
    sc = world.scene(index, split="test")
    buf = io.BytesIO()
    sc.image.save(buf, "PNG")
    return buf.getvalue(), [o.mask for o in sc.objects], [o.label for o in sc.objects], world.class_names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO_ROOT / "label_config" / "brush.xml"), help="label config XML")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "screenshot_labelling.png"))
    p.add_argument("--model", default=None, help="MASKINV_MODEL (default: scene model if trained, else tiny)")
    p.add_argument("--pretrained", default=None, help="MASKINV_PRETRAINED")
    p.add_argument("--size", type=int, default=None,
                   help="MASKINV_SIZE for the backend (default: 112 for the scene model, its training size; else 224)")
    p.add_argument("--scene", type=int, default=3, help="scene index (test split)")
    p.add_argument("--image-size", type=int, default=448, help="scene image side in pixels")
    p.add_argument("--width", type=int, default=1440)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args(argv)

    trained = SCENE_CHECKPOINT.exists() and args.model is None
    model = args.model or ("maskinv-scene-tiny" if trained else "maskinv-test-tiny")
    pretrained = args.pretrained or (str(SCENE_CHECKPOINT) if trained else "none")
    size = args.size or (112 if model == "maskinv-scene-tiny" else 224)
    xml = Path(args.config).read_text()
    png, masks, truth, vocabulary = scene(args.scene, args.image_size)
    if model == "maskinv-scene-tiny":  # the scene CLIP knows the scene world's colour-shape words
        xml = with_vocabulary(xml, vocabulary)
    print(f"model {model} ({pretrained}) at {size} px; objects: {truth}")

    root = ET.fromstring(xml)
    control = next(e for e in root.iter() if e.tag in REGION_TAGS)
    image_name = next(e.get("name") for e in root.iter() if e.tag == "Image")

    with tempfile.TemporaryDirectory(prefix="maskinv-screenshot-") as tmp:
        ls_server = LabelStudioServer(Path(tmp) / "label-studio")
        backend = None
        try:
            ls_server.start()
            token = ls_server.personal_access_token()
            ls = LabelStudioClient(ls_server.url, token)
            backend = BackendServer(Path(tmp) / "backend.log", env={
                "MASKINV_MODEL": model, "MASKINV_PRETRAINED": pretrained, "MASKINV_SIZE": str(size),
                "LABEL_STUDIO_URL": ls_server.url, "LABEL_STUDIO_API_KEY": token}).start()
            project = ls.create_project("MaskInversion suggestions", xml)
            ml = ls.connect_ml_backend(project["id"], backend.url)
            (task,) = ls.upload_images(project["id"], [("scene.png", png)])
            regions = [region_for_mask(control, image_name, m, f"obj{k}") for k, m in enumerate(masks)]
            answer = ls.interactive_annotating(ml["id"], task["id"], regions)
            if "data" not in answer:
                raise SystemExit(f"no suggestion: {answer}")
            result = answer["data"]["result"]
            for r in result:
                if r.get("type") == control.tag.lower():
                    value = r['value'][control.tag.lower()][0]
                    print(f"  {r['id']}: {value} ({r['score']:.2f})  {r['meta']['text'][0]}")
                elif r.get("type") == "textarea":
                    print(f"  {r['id']}: caption {r['value']['text'][0]!r}")
            ls.create_annotation(task["id"], result)  # the annotator accepts the suggestions
            shoot(ls_server, project["id"], task["id"], Path(args.out), args)
        finally:
            if backend is not None:
                backend.stop()
            ls_server.stop()
    print(f"wrote {args.out}")
    return 0


def shoot(ls_server: LabelStudioServer, project_id: int, task_id: int, out: Path, args: argparse.Namespace) -> None:
    """Open the task's labelling page logged in, select the first region (shows its caption), save a PNG."""
    from playwright.sync_api import sync_playwright

    session = ls_server.login_session()
    cookies = [{"name": c.name, "value": c.value, "url": ls_server.url} for c in session.cookies]
    with tempfile.TemporaryDirectory(prefix="maskinv-chromium-") as profile, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": args.width, "height": args.height}, device_scale_factor=1)
        try:
            browser.add_cookies(cookies)
            page = browser.new_page()
            page.goto(f"{ls_server.url}/projects/{project_id}/data?task={task_id}", wait_until="networkidle",
                      timeout=120_000)
            page.wait_for_selector("canvas", timeout=120_000)
            page.wait_for_timeout(3000)  # image decode + region rendering
            # select the first region in the outliner: its details (score, top-k) and caption field show up
            label = page.locator(".lsf-outliner-item__title").first
            if label.count():
                label.click()
                page.wait_for_timeout(1500)
            else:
                print("note: no region list item found to select; screenshot without a selected region")
            (out.parent / "dom.html").write_text(page.content()) if os.environ.get("MASKINV_SHOT_DOM") else None
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=False)
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
