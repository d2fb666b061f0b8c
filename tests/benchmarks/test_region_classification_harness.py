"""The region-classification harness runs end to end on any model (here the random tiny test model), so a
break in the COCO reader, the scene-world export, the engine or the scorer fails CI even without the trained
scene CLIP (whose accuracy bars are in test_region_classification.py)."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import region_classification as rc


def test_benchmark_command_writes_a_table_for_any_model(tmp_path):
    out = tmp_path / "rc.md"
    report = rc.main(["--scene-world", "3", "--model", "maskinv-test-tiny", "--pretrained", "none", "--size", "64",
                      "--steps", "3", "--out", str(out), "--methods", "maskinversion", "global", "masked_crop"])
    text = out.read_text()
    for method in ("maskinversion", "global", "masked_crop"):
        assert f"| {method} |" in text
    assert "| crop |" not in text
    data = json.loads(out.with_suffix(".json").read_text())
    n = report.stats["global"].count()
    assert n > 0 and data["methods"]["maskinversion"]["regions_all"] == n
    assert np.isfinite(data["dice_before"]) and np.isfinite(data["dice_after"])
    for stats in report.stats.values():  # ranks are valid ranks among the 36 scene-world classes
        assert all(0 <= r < 36 for r in stats.ranks)
