"""Label configs: the shipped ones parse, and predictions built for them pass label-studio-sdk's validator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.label_config import LabelConfigError, parse_label_config
from backend.labelstudio.predictions import alternatives_text, region_results, task_prediction
from backend.labelstudio.regions import collect_regions
from worker.protocol import LabelScore, RegionResult

CONFIGS = Path(__file__).resolve().parents[3] / "label_config"
SHIPPED = {"brush": "brushlabels", "polygon": "polygonlabels", "rectangle": "rectanglelabels"}
GEOMETRY = {
    "brush": {"format": "rle", "rle": mask2rle(np.pad(np.ones((4, 4), np.uint8) * 255, 3))},
    "polygon": {"points": [[10, 10], [60, 15], [40, 70]], "closed": True},
    "rectangle": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 12},
}
RES = RegionResult.from_dict({
    "id": "r",
    "labels": [{"label": "dog", "score": 0.7}, {"label": "cat", "score": 0.2}, {"label": "car", "score": 0.1}],
    "caption": "a brown dog", "caption_mode": "retrieval", "error": None})


def test_all_shipped_configs_are_tested():
    assert sorted(p.stem for p in CONFIGS.glob("*.xml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_parses(name):
    cfg = parse_label_config((CONFIGS / f"{name}.xml").read_text())
    assert [n for n, c in cfg.region_controls.items() if c.answers_as is None] == ["label"]
    # polygon and brush projects: Label Studio's smart box and keypoint mark objects for the labelled control
    prompts = {n: c.answers_as.name for n, c in cfg.region_controls.items() if c.answers_as is not None}
    assert prompts == ({} if name == "rectangle" else {"box": "label", "point": "label"})
    control = cfg.control("label")
    assert control.tag == SHIPPED[name] and control.to_name == "image" and control.labels_control == "label"
    assert len(control.labels) >= 5 and "dog" in control.labels
    assert cfg.images["image"].data_key == "image"
    assert cfg.captions["image"].name == "caption"
    assert LabelInterface(cfg.xml).is_valid  # Label Studio's schema accepts the XML


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_prediction_for_shipped_config_is_valid(name):
    cfg = parse_label_config((CONFIGS / f"{name}.xml").read_text())
    rtype = SHIPPED[name]
    drawn = {"id": "reg1", "from_name": "label", "to_name": "image", "type": rtype, "original_width": 10,
             "original_height": 10, "image_rotation": 0, "value": {**GEOMETRY[name], rtype: ["car"]}}
    (region,), problems = collect_regions([drawn], cfg)
    assert not problems
    results = region_results(region, RES, cfg)
    pred = task_prediction(results, [0.7], "maskinversion-test", {})
    assert cfg.validate_prediction(pred) == []
    label_item, caption_item = results
    # same id, type and geometry as drawn; predicted label; top-k in meta; caption in the per-region TextArea
    assert label_item["id"] == caption_item["id"] == "reg1"
    assert label_item["type"] == rtype and label_item["value"][rtype] == ["dog"]
    assert {k: v for k, v in label_item["value"].items() if k != rtype} == GEOMETRY[name]
    assert label_item["score"] == pytest.approx(0.7)
    assert label_item["meta"]["text"] == ["MaskInversion top-3: dog 0.70 · cat 0.20 · car 0.10"]
    assert caption_item["type"] == "textarea" and caption_item["value"]["text"] == ["a brown dog"]
    assert caption_item["from_name"] == "caption"
    # a label outside the vocabulary would be refused by the validator (so it is a meaningful check)
    bad = {**label_item, "value": {**label_item["value"], rtype: ["zebra"]}}
    assert cfg.validate_prediction(task_prediction([bad], [0.7], "v", {}))


def test_alternatives_text():
    assert alternatives_text([LabelScore("a", 0.5)]) == "MaskInversion top-1: a 0.50"


def test_plain_tool_with_labels_control_predicts_merged_result():
    cfg = parse_label_config("""<View><Image name="img" value="$url"/><Polygon name="poly" toName="img"/>
      <Labels name="lab" toName="img"><Label value="dog"/><Label value="cat"/><Label value="car"/></Labels>
      </View>""")
    drawn = {"id": "p1", "from_name": "poly", "to_name": "img", "type": "polygon", "original_width": 10,
             "original_height": 10, "value": GEOMETRY["polygon"]}
    (region,), _ = collect_regions([drawn], cfg)
    (item,) = region_results(region, RES, cfg)  # no caption field in this config
    assert item["from_name"] == "lab" and item["type"] == "polygonlabels" and item["value"]["polygonlabels"] == ["dog"]
    assert cfg.validate_prediction(task_prediction([item], [0.7], "v", {})) == []


def test_plain_tool_without_labels_uses_env_vocabulary():
    xml = """<View><Image name="img" value="$url"/><Rectangle name="box" toName="img"/>
      <TextArea name="txt" toName="img" perRegion="true"/></View>"""
    with pytest.raises(LabelConfigError, match="no label vocabulary"):
        parse_label_config(xml)
    cfg = parse_label_config(xml, extra_labels=("dog", "cat", "car"))
    assert cfg.control("box").labels == ("dog", "cat", "car") and cfg.control("box").labels_control is None
    drawn = {"id": "b1", "from_name": "box", "to_name": "img", "type": "rectangle", "original_width": 10,
             "original_height": 10, "value": GEOMETRY["rectangle"]}
    (region,), _ = collect_regions([drawn], cfg)
    box, text = region_results(region, RES, cfg)
    assert box["type"] == "rectangle" and box["value"] == GEOMETRY["rectangle"] and "dog 0.70" in box["meta"]["text"][0]
    assert text["value"]["text"] == ["a brown dog"]
    assert cfg.validate_prediction(task_prediction([box, text], [0.7], "v", {})) == []


@pytest.mark.parametrize("xml, match", [
    ("", "empty"),
    ("<View><Image name='i' value='$x'/>", "cannot parse"),
    ("<View><Text name='t' value='$x'/><Labels name='l' toName='t'><Label value='a'/></Labels></View>",
     "no region control"),
    ("<View><Image name='i' value='$x'/><KeyPointLabels name='k' toName='i'><Label value='a'/></KeyPointLabels>"
     "</View>", "no region control"),
    ('<View><Image name="i" value="$x"/><RectangleLabels name="r" toName="nope"><Label value="a"/>'
     '</RectangleLabels></View>', "invalid label config"),
])
def test_unusable_configs_are_rejected_clearly(xml, match):
    with pytest.raises(LabelConfigError, match=match):
        parse_label_config(xml)


def test_multiple_images_and_controls():
    cfg = parse_label_config("""<View>
      <Image name="left" value="$a"/><Image name="right" value="$b"/>
      <BrushLabels name="bl" toName="left"><Label value="x"/></BrushLabels>
      <RectangleLabels name="rl" toName="right"><Label value="y"/><Label value="z"/></RectangleLabels>
      <TextArea name="cap" toName="right" perRegion="true"/>
      <TextArea name="notes" toName="left"/>
    </View>""")
    assert cfg.control("bl").to_name == "left" and cfg.control("rl").labels == ("y", "z")
    assert set(cfg.images) == {"left", "right"} and cfg.images["right"].data_key == "b"
    assert list(cfg.captions) == ["right"]  # a TextArea without perRegion is not a caption field
