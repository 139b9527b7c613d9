import dataclasses
import os
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn
from torchvision.ops import box_iou

from maskrcnn.config import BackboneConfig, ModelConfig
from maskrcnn.model import build_model, from_torchvision
from maskrcnn.model.convert import from_torchvision_state_dict, to_torchvision_state_dict
from maskrcnn.model.pretrained import WeightsError, torchvision_compatible_config

# set by tests/conftest.py when ../shared/data/PennFudanPed exists; the real-photo test skips without it
PENNFUDAN = Path(os.environ["MASKRCNN_PENNFUDAN"]) if os.environ.get("MASKRCNN_PENNFUDAN") else None


@pytest.fixture(scope="module")
def torchvision_model():
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).eval()
    model.transform.min_size = (320,)
    model.transform.max_size = 512
    # fewer proposals and detections than torchvision's 1000 / 1000 / 100: the same operations, a fifth of the
    # box and mask heads' time (they took most of it)
    model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = 300, 150
    model.roi_heads.detections_per_img = 20
    with torch.no_grad():
        # random-init mask logits saturate: sigmoid is exactly 1.0 inside and the padded paste puts pixels at
        # exactly 0.5 on the border, where float rounding order decides the threshold. Milder logits keep the
        # comparison about the model, not about ties.
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.05)
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(0.1)
    return model


def synthetic_images():
    """Two smooth-blob images on a gradient (240 x 320, 300 x 200): stand-ins that need no data."""
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 24, 32, generator=generator).repeat_interleave(10, 1).repeat_interleave(10, 2) * 0.8,
            torch.rand(3, 30, 20, generator=generator).repeat_interleave(10, 1).repeat_interleave(10, 2)]


def pennfudan_photos(count=2):
    """The first `count` Penn-Fudan photos at half their size, or [] when the data are absent."""
    files = sorted((PENNFUDAN / "PNGImages").glob("*.png"))[:count] if PENNFUDAN else []
    images = []
    for file in files:
        image = torch.from_numpy(np.array(Image.open(file).convert("RGB"))).permute(2, 0, 1).float() / 255
        images.append(torch.nn.functional.interpolate(image[None], scale_factor=0.5, mode="bilinear")[0])
    return images


def _mask_iou(a, b):
    a, b = a[:, 0] >= 0.5, b[:, 0] >= 0.5
    union = (a | b).flatten(1).sum(1)
    inter = (a & b).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union, dtype=torch.float32))


def assert_same_detections(expected, got, *, every_mask):
    """Every torchvision detection has one of ours of its label with box IoU >= 0.99 (or every coordinate within
    0.01 px: a sliver 0.13 px high at the image border falls to IoU 0.979 by a 0.003 px rounding) and a score
    within 1e-3, and as many of each; masks IoU >= 0.98: every mask (`every_mask`), or those of 100+ pixels and all
    pixels of the image together (one-pixel shifts of tiny masks: rounding of torchvision's integer paste box)."""
    for theirs, mine in zip(expected, got):
        assert mine["boxes"].shape == theirs["boxes"].shape and theirs["boxes"].shape[0] > 0
        # match every torchvision detection to ours of the same label by box IoU
        iou = box_iou(theirs["boxes"], mine["boxes"])
        iou[theirs["labels"][:, None] != mine["labels"][None, :]] = 0
        best_iou, match = iou.max(dim=1)
        within_rounding = (theirs["boxes"] - mine["boxes"][match]).abs().amax(dim=1) <= 0.01
        assert ((best_iou >= 0.99) | within_rounding).all(), best_iou.min().item()
        assert (theirs["scores"] - mine["scores"][match]).abs().max().item() <= 1e-3
        mask_iou = _mask_iou(theirs["masks"], mine["masks"][match])
        if every_mask:
            assert mask_iou.min().item() >= 0.98
        else:
            large = (theirs["masks"] >= 0.5).flatten(1).sum(1) >= 100
            assert large.any() and mask_iou[large].min().item() >= 0.98
            assert _mask_iou(theirs["masks"].amax(0, keepdim=True), mine["masks"].amax(0, keepdim=True)) >= 0.98


@pytest.fixture(scope="module")
def torchvision_outputs(torchvision_model):
    """torchvision's detections of the synthetic images."""
    images = synthetic_images()
    with torch.no_grad():
        return images, torchvision_model(images)


@pytest.mark.parametrize("cpu_speedups", [False, True], ids=["plain", "cpu-speedups-default"])
def test_same_detections_as_torchvision_on_synthetic_images(torchvision_model, torchvision_outputs, cpu_speedups):
    # False: torchvision's memory layout and unfused BatchNorm, the same float operations in the same order
    ours = from_torchvision(torchvision_model, cpu_speedups=cpu_speedups)
    assert ours.transform.min_size == 320 and ours.transform.max_size == 512
    assert ours.paste_mode == "torchvision" and ours.box_head.pooler.aligned is False
    images, expected = torchvision_outputs
    with torch.no_grad():
        got = ours(images)
    # with the speed layer, NHWC convolutions and folded BatchNorm round differently: boxes move by ~1e-4 px,
    # which can flip torchvision's integer rounding of the paste box and shift a tiny mask by one pixel
    assert_same_detections(expected, got, every_mask=not cpu_speedups)


def test_same_detections_as_torchvision_on_a_penn_fudan_photo(torchvision_model):
    """One street photo at half size (skipped without Penn-Fudan), with the speed layer on (the default)."""
    images = pennfudan_photos(1)
    if not images:
        pytest.skip("no Penn-Fudan photos: set MASKRCNN_PENNFUDAN to the PennFudanPed folder")
    ours = from_torchvision(torchvision_model)
    with torch.no_grad():
        assert_same_detections(torchvision_model(images), ours(images), every_mask=False)


def test_state_dict_round_trip(torchvision_model):
    ours = from_torchvision(torchvision_model.state_dict())
    assert ours.box_head.num_classes == 2  # torchvision's num_classes=3 counts the background
    back = to_torchvision_state_dict(ours.state_dict())
    reference = torchvision_model.state_dict()
    assert set(back) == set(reference)
    for key, value in reference.items():
        assert torch.equal(back[key], value), key


def test_legacy_key_names():
    legacy = {"rpn.head.conv.weight": torch.zeros(1), "backbone.fpn.inner_blocks.2.bias": torch.zeros(1),
              "roi_heads.mask_head.mask_fcn3.weight": torch.zeros(1),
              "roi_heads.box_predictor.bbox_pred.bias": torch.zeros(1)}
    assert set(from_torchvision_state_dict(legacy)) == {
        "rpn.head.conv.0.0.weight", "backbone.fpn.inner_blocks.2.0.bias", "mask_head.convs.2.weight",
        "box_head.bbox_pred.bias"}


def test_compatible_config():
    cfg = torchvision_compatible_config(7)
    assert cfg.num_classes == 7 and cfg.roi_align_aligned is False and cfg.paste_mode == "torchvision"
    assert (cfg.transform.min_size, cfg.transform.max_size) == (800, 1333)
    assert (cfg.box_head.score_thresh, cfg.box_head.nms_thresh, cfg.box_head.detections_per_img) == (0.05, 0.5, 100)


def test_torchvision_coco_weights_offline_and_fine_tuning(monkeypatch, tmp_path, torchvision_model, caplog):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = dataclasses.replace(ModelConfig(num_classes=1), weights="torchvision-coco")
    with pytest.raises(WeightsError, match="cannot download"):
        build_model(cfg)

    # a stand-in for the COCO file with 2 foreground classes, put into the hub cache: the 1-class model keeps its
    # own predictor
    state = torchvision_model.state_dict()
    torch.save(state, tmp_path / "hub" / "checkpoints" / Path(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url).name)
    with caplog.at_level("INFO"):
        model = build_model(cfg)
    assert ("2 classes, the model 1: class-dependent layers box_head.cls_score, box_head.bbox_pred, mask_head.logits "
            "re-initialised") in caplog.text
    assert torch.equal(model.box_head.fc6.weight, state["roi_heads.box_head.fc6.weight"])
    assert model.box_head.cls_score.weight.shape[0] == 2
    # another backbone or FPN width: one line naming the setting, the first key that does not fit and both shapes
    with pytest.raises(WeightsError, match=r"^[^\n]*depth=50 and fpn_channels=256\): backbone.body.layer1.0.conv1.weight "
                                           r"has shape \[64, 64, 1, 1\] in the weights, \[64, 64, 3, 3\] in the "
                                           r"model \(and \d+ more\)$"):
        build_model(dataclasses.replace(cfg, backbone=BackboneConfig(depth=18)))
    with pytest.raises(WeightsError, match=r"backbone.fpn.inner_blocks.0.0.weight has shape \[256, 256, 1, 1\] in "
                                           r"the weights, \[128, 256, 1, 1\]"):
        build_model(dataclasses.replace(cfg, backbone=BackboneConfig(fpn_channels=128)))
