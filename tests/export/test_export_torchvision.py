"""Export of a converted torchvision `maskrcnn_resnet50_fpn`: the ExportedProgram gives the eager model's
detections on generated images and on a Penn-Fudan photo."""

from __future__ import annotations

import pytest
import torch
from exported import assert_contract, assert_same_detections, batches, generated_images, penn_fudan_photos
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn.cli import main
from maskrcnn.export import ProgramPredictor, export_program
from maskrcnn.export.exporter import export_info
from maskrcnn.model import from_torchvision


@pytest.fixture(scope="module")
def torchvision_exported():
    """A randomly initialised torchvision maskrcnn_resnet50_fpn (no download possible here), converted by
    `from_torchvision`, exported once as an ExportedProgram (its translation to ONNX, the same for every model, is
    tested with the trained and the preset models). Its RPN and class logits are scaled up, so that scores spread
    out: at random init they are all about 1/(K+1), and the order of near-ties would test float rounding, not the
    graph (scaled too far, sigmoid and softmax saturate at exactly 1.0: ties again, which NMS breaks by order).
    The 240 x 320 images are resized down to 192 x 256, with 150 proposals and 20 detections an image, not 1000
    and 100: the graph is the same, and the box head's first layer on 1000 proposals and the mask head's 4
    convolutions on 100 boxes took most of the 1.3 s an image costs on one core at torchvision's settings."""
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).eval()
    tv.transform.min_size, tv.transform.max_size = (192,), 256
    tv.roi_heads.detections_per_img = 20
    tv.rpn._pre_nms_top_n["testing"], tv.rpn._post_nms_top_n["testing"] = 300, 150  # torchvision's: 1000, 1000
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.mul_(6.0)
        tv.rpn.head.cls_logits.weight.mul_(3.0)
        tv.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.05)
    model = from_torchvision(tv)
    return model, ProgramPredictor(export_program(model), export_info(model))


@pytest.mark.parametrize("batch", ["two_and_blank", "penn_fudan_photo"])
def test_converted_torchvision_model_exports_equal_eager(torchvision_exported, batch):
    """3 generated images, the middle one blank (`batches`), and one street photo alone (skipped without
    Penn-Fudan). Batches of one image, and of a size that float32 resizes otherwise (`batches`' "odd"), are in the
    trained model's export tests."""
    model, predictor = torchvision_exported
    images = penn_fudan_photos(1) if batch == "penn_fudan_photo" else batches(generated_images())[batch]
    assert predictor.info.paste_mode == "torchvision"
    with torch.no_grad():
        expected = model(images)
    assert sum(len(e["boxes"]) for e in expected) > 0
    assert_same_detections(expected, predictor(images))
    assert_contract(predictor, images, 20, 28, 3)


def test_export_torchvision_flag_refuses_another_file(tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    assert main(["export", str(weights), "--torchvision", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not a torchvision Mask R-CNN state dict" in capsys.readouterr().err
