"""Export of the `seed` preset's shape family: the fixed canvas turned for portrait batches, with an RPN score
threshold; the ONNX graph gives the eager model's detections on landscape, portrait and mixed generated images, and
on a Penn-Fudan photo. ONNX only: it is the translation of the ExportedProgram, so it holds the program's mistakes and
its own; the .pt2 runtime is tested with the trained, lite and torchvision models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from exported import assert_contract, assert_same_detections, generated_images, penn_fudan_photos, spread_scores

import maskrcnn
from maskrcnn.config import load_config
from maskrcnn.export import OnnxPredictor, export_program
from maskrcnn.export.exporter import export_info, save_program
from maskrcnn.model import build_model

pytest.importorskip("onnxruntime", reason="the optional extra maskrcnn[export] is not installed")

PRESETS = Path(maskrcnn.__file__).parent / "configs"


def resized(images: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """`images` f32[3, h, w] resized to f32[3, *size] (size: H, W)."""
    return [torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")[0] for image in images]


@pytest.fixture(scope="module")
def seed_family(tmp_path_factory):
    """The `seed` preset's model with its sizes scaled down about 4x (the graph is the same; the images cost 13x
    less): a fixed 224x288 canvas for the preset's 800x1088 (turned to 288x224 for portrait batches), min 200 /
    max 266 px for its 800 / 1066, its box-head settings; on a thin ResNet-18 with trainable BatchNorm (folded
    into the convs at inference), with rpn.score_thresh 0.55, which drops about a third of the proposals of these
    images, and 450 proposals kept after NMS: about 520 pass it without the threshold, 365-385 with it. Exported
    to ONNX once."""
    cfg = load_config(PRESETS / "seed.yaml", ["model.backbone.depth=18", "model.backbone.weights=none",
                                              "model.backbone.fpn_channels=32", "model.rpn.score_thresh=0.55",
                                              "model.box_head.detections_per_img=20", "model.transform.min_size=200",
                                              "model.transform.max_size=266", "model.transform.fixed_canvas=[224,288]",
                                              "model.rpn.post_nms_top_n_test=450"]).model
    torch.manual_seed(0)
    model = spread_scores(build_model(cfg), seed=1, class_std=0.1)
    path = tmp_path_factory.mktemp("seed") / "seed.onnx"
    save_program(export_program(model), export_info(model), path)
    return model, OnnxPredictor(path)


@pytest.fixture(scope="module")
def seed_eager(seed_family):
    """The eager model's detections of generated images: {"landscape" / "portrait" / "mixed": (images,
    detections)}; landscape and portrait batches are checked to land on their canvas and to lose proposals to the
    RPN score threshold."""
    model, _ = seed_family
    landscape, portrait = resized(generated_images()[:2], (300, 400)), resized(generated_images()[:2], (400, 300))
    expected = {}
    with torch.no_grad():
        for name, images, canvas in (("landscape", landscape, (224, 288)), ("portrait", portrait, (288, 224))):
            assert tuple(model.transform(images)[0].tensor.shape[-2:]) == canvas
            proposals = model.inference(images, return_proposals=True)
            assert all(len(p["proposals"]) < model.rpn.post_nms_top_n_test for p in proposals)  # the filter acts
            expected[name] = images, [{k: v for k, v in p.items() if not k.startswith("proposal")} for p in proposals]
            assert sum(len(e["boxes"]) for e in expected[name][1]) > 0
        # images of different sizes run one at a time, each on the canvas of its own orientation
        mixed = [landscape[0], portrait[1]]
        expected["mixed"] = mixed, [model([image])[0] for image in mixed]
    return expected


def test_seed_preset_exports_equal_eager_on_landscape_portrait_and_mixed_generated_images(seed_family, seed_eager):
    predictor = seed_family[1]
    for name, (images, expected) in seed_eager.items():
        assert_same_detections(expected, predictor(images))
        if name != "mixed":
            assert_contract(predictor, images, 20, 28, 3)


def test_seed_preset_exports_equal_eager_on_a_penn_fudan_photo(seed_family):
    """One street photo (skipped without Penn-Fudan) on the landscape canvas."""
    model, predictor = seed_family
    photo = resized(penn_fudan_photos(1), (300, 400))
    with torch.no_grad():
        expected = model(photo)
    assert len(expected[0]["boxes"]) > 0
    assert_same_detections(expected, predictor(photo))
