"""The search page the backend serves (``GET /search``) and the region crops it shows (``GET /search/crop``).

The page is one static HTML document: a form (projects, text or label, k) that posts to ``POST /search`` on the
same path (so it works under the ``MASKINV_URL_SECRET`` prefix and basic auth), and a grid of hits: the region's
crop, similarity, label, source, and a link to the task in Label Studio. A crop is the region's box (plus a
margin) cut from the task's image, fetched within the image policy the way ``/predict`` fetches it, as PNG of
at most :data:`CROP_SIDE` pixels a side.
"""

from __future__ import annotations

import io
import time
from typing import Any

from PIL import Image

from backend.labelstudio.api import LabelStudioAPI
from backend.search.api import current_model
from backend.search.records import MAX_ID_CHARS, SearchFilter, SearchInputError
from backend.service import Service

#: longest side of a crop, pixels
CROP_SIDE = 160
#: margin around a region's box, in percent of the box's side
MARGIN = 0.15

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MaskInversion region search</title>
<style>
 body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
 form{display:flex;gap:.5em;flex-wrap:wrap;align-items:end;margin-bottom:1em}
 label{display:flex;flex-direction:column;font-size:12px;color:#555}
 input,select,button{font:inherit;padding:.3em}
 #grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8em}
 figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:5px;background:#fafafa}
 figure img{width:160px;height:120px;object-fit:contain;background:#eee;display:block}
 figcaption{font-size:12px;line-height:1.4}
 .sim{font-weight:600} #status{color:#555;margin:.5em 0} .error{color:#b00}
</style></head><body>
<h1>Region search</h1>
<form id="q">
 <label>projects <input name="projects" placeholder="3, 7" required size="8"></label>
 <label>search by <select name="kind"><option value="text">text</option><option value="label">label</option>
   <option value="coverage">coverage</option></select></label>
 <label>text or label <input name="text" placeholder="rusty valve" size="28"></label>
 <label>hits <input name="k" type="number" value="24" min="1" max="500" size="4"></label>
 <label>to Label Studio <input name="to_ls" type="checkbox"></label>
 <button type="submit">Search</button>
</form>
<div id="status"></div><div id="grid"></div>
<script>
const form = document.getElementById("q"), grid = document.getElementById("grid"),
      status = document.getElementById("status");
const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
function esc(s){return String(s).replace(/[&<>"']/g, c => ESC[c]);}
form.addEventListener("submit", async ev => {
  ev.preventDefault();
  const f = new FormData(form), kind = f.get("kind");
  const body = {projects: f.get("projects").split(/[ ,]+/).filter(Boolean), k: Number(f.get("k")),
                to_label_studio: f.get("to_ls") === "on"};
  if (kind === "coverage") body.coverage = true; else body[kind] = f.get("text");
  status.textContent = "searching..."; status.className = ""; grid.innerHTML = "";
  const resp = await fetch(window.location.pathname, {method: "POST", headers: {"Content-Type": "application/json"},
                                                     body: JSON.stringify(body)});
  const doc = await resp.json();
  if (!resp.ok) { status.textContent = doc.error || resp.statusText; status.className = "error"; return; }
  const written = (doc.label_studio || []).map(w => ` · ${w.regions} region(s) written as ${w.model_version}`);
  status.textContent = `${doc.hits.length} hit(s) · query ${doc.query} · ${doc.model}${written.join("")}`;
  const base = window.location.pathname.replace(/\\/$/, "");
  grid.innerHTML = doc.hits.map(h => {
    const q = new URLSearchParams({project: h.project, task: h.task, region: h.region, annotation: h.annotation});
    const link = h.link ? `<a href="${esc(h.link)}" target="_blank" rel="noopener">task ${esc(h.task)}</a>`
                        : `task ${esc(h.task)}`;
    return `<figure class="hit"><img loading="lazy" alt="${esc(h.label)}" src="${esc(base)}/crop?${q}">` +
           `<figcaption><span class="sim">${h.similarity.toFixed(3)}</span> ${esc(h.label)}<br>` +
           `${esc(h.source)} · score ${Number(h.score).toFixed(2)}<br>${link}</figcaption></figure>`;
  }).join("");
});
</script></body></html>
"""


def crop_png(service: Service, args: Any) -> bytes:
    """PNG of one indexed region's crop (``args``: ``project``, ``task``, ``region``, ``annotation``)."""
    index = service.search_index
    if index is None:
        raise SearchInputError("region search is off (MASKINV_SEARCH_STORE=off)")
    project, region, annotation = (str(args.get(k) or "") for k in ("project", "region", "annotation"))
    task_raw = str(args.get("task") or "")
    if (not project or not region or not task_raw.isdigit()
            or max(map(len, (project, region, annotation))) > MAX_ID_CHARS):
        raise SearchInputError("crop needs project, task (an integer) and region")
    task = int(task_raw)
    model = current_model(service)
    recs = [r for r in index.store.fetch(SearchFilter(model=model, projects=(project,)), 10_000, [task])[0]
            if r.region == region and r.annotation == annotation]
    if not recs:
        raise SearchInputError(f"region {region!r} of task {task} is not in the index")
    hostname, token = service.setup_fallbacks()
    url = service.settings.label_studio_url or hostname
    key = service.settings.label_studio_api_key or token
    if not url or not key:
        raise SearchInputError("crops need LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or a /setup that sent them)")
    data = LabelStudioAPI(url, key).get_task(task).get("data") or {}
    image_url = next((v for v in data.values() if isinstance(v, str)), None)
    blob = service.fetcher.fetch(image_url, task, hostname, token,
                                 deadline=time.monotonic() + service.settings.fetch_timeout_s)
    with Image.open(io.BytesIO(blob)) as src:
        img = src.convert("RGB")
    x, y, w, h = recs[0].box
    if w > 0 and h > 0:
        mx, my = w * MARGIN, h * MARGIN
        img = img.crop((int(max(0.0, x - mx) * img.width / 100), int(max(0.0, y - my) * img.height / 100),
                        int(round(min(100.0, x + w + mx) * img.width / 100)),
                        int(round(min(100.0, y + h + my) * img.height / 100))))
    img.thumbnail((CROP_SIDE, CROP_SIDE))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
