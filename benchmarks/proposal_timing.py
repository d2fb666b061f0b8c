"""Wall-clock of the ``propose_regions`` job per image on the CPU.

Runs the real job (``worker.jobs.propose.propose_regions``: candidates, inversion of every candidate, NMS,
threshold, cap, captions) in this process on a few scene-world val scenes with the worker's default proposal
settings (MASKINV_PROPOSAL_SOURCES etc. from the environment), and prints per image the job's own timings. The
first image is a warm-up (text prototypes, caption tables) and reported apart.

    python -m benchmarks.proposal_timing --size 448 --images 4                      # committed tiny scene CLIP
    python -m benchmarks.proposal_timing --size 448 --images 2 --model ViT-B-16 --pretrained none
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from typing import Sequence

import torch


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--images", type=int, default=4, help="val scenes timed after the warm-up one")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default=None, help="[the committed tiny scene CLIP]")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)

    from benchmarks.proposals import SCENE_CHECKPOINT, SCENE_MODEL
    from training.scene_world import SceneWorld

    os.environ.setdefault("MASKINV_DEVICE", "cpu")
    os.environ["MASKINV_MODEL"] = a.model or SCENE_MODEL
    os.environ["MASKINV_PRETRAINED"] = a.pretrained if a.pretrained is not None else str(SCENE_CHECKPOINT)
    os.environ.setdefault("MASKINV_MAX_SIZE", str(max(a.size, 448)))
    from worker.jobs import regions as jobs
    from worker.jobs.propose import propose_regions
    from worker.protocol import InversionParams, encode_image

    world = SceneWorld(seed=0, image_size=112)
    rt = jobs.get_runtime()
    rows = []
    for k in range(a.images + 1):
        buf = io.BytesIO()
        world.scene(k, "val").image.save(buf, "PNG")
        job = {"v": 1, "image": encode_image(buf.getvalue()), "labels": list(world.class_names),
               "params": InversionParams(size=a.size, steps=a.steps).to_dict()}
        t0 = time.perf_counter()
        out = propose_regions(job)
        wall = time.perf_counter() - t0
        assert not out.get("error"), out.get("error")
        t = out["timings"]
        rows.append({"image": k, "warm_up": k == 0, "wall_s": wall, "kept": len(out["regions"]),
                     "inverted": int(t.get("inverted", 0)), "candidates_s": t.get("candidates_s"),
                     "inversion_s": t.get("inversion_s"), "total_s": t.get("total_s")})
        print({key: (round(v, 2) if isinstance(v, float) else v) for key, v in rows[-1].items()}, flush=True)
    timed = [r for r in rows if not r["warm_up"]]
    mean = {key: sum(r[key] for r in timed) / len(timed) for key in ("wall_s", "candidates_s", "inversion_s")}
    print(f"model {rt.clip.id}, size {a.size}, sources {','.join(rt.settings.proposals.sources)}, "
          f"{len(timed)} images: job {mean['wall_s']:.1f} s / image (candidates {mean['candidates_s']:.1f} s, "
          f"inversion {mean['inversion_s']:.1f} s); {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": rt.clip.id, "size": a.size, "rows": rows, "mean": mean}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
