"""Runs the public MaskInversion package on an attention-pooled tower, in the official venv (argv: spec.json).

Reads ``inputs`` (visual state dict, pixels [1, 3, S, S], mask targets [N, S, S], empty-prompt vector [D], probe
embeddings [P, D]); writes the map of each probe and the LETs of each mask, each inverted in its own call (with
their times), and with ``batched`` the package's one call over all masks. Used by
tests/worker/engine/test_attn_pool_official.py and benchmarks/bench_vs_official.py --siglip.
"""
import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from maskinversion import MaskInversion  # noqa: E402

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
data = torch.load(spec["inputs"])
model = open_clip.create_model(spec["model"], pretrained=None)
model.visual.load_state_dict(data["visual"])
model.eval()
mi = MaskInversion(model, layer_index=-1, alpha=0.0, lr=0.1, iterations=spec["steps"], wd=0.0)
mi.empty_embedding = F.normalize(data["empty"], dim=0)[:, None]  # [D, 1], as _init_empty_embedding stores it
pixels, masks = data["pixels"], data["masks"]
out = {}
if len(data["probes"]):
    out["maps"] = torch.cat([mi.compute_legrad(F.normalize(p[None], dim=-1), image=pixels).detach()[:, 0]
                             for p in data["probes"]])
lets, times = [], []
for i in range(masks.shape[0]):
    t0 = time.perf_counter()
    lets.append(mi.compute_maskinversion(pixels, masks[i:i + 1], iterations=spec["steps"]).detach())
    times.append(time.perf_counter() - t0)
if spec.get("batched") and masks.shape[0] > 1:  # the package's own batched call (one map for all masks)
    t0 = time.perf_counter()
    out["batched_lets"] = mi.compute_maskinversion(pixels, masks, iterations=spec["steps"]).detach()
    out["batched_time"] = time.perf_counter() - t0
out["lets"] = torch.cat(lets)
out["times"] = torch.tensor(times)
torch.save(out, spec["out"])
