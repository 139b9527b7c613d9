"""torchvision's `maskrcnn_resnet50_fpn_v2` built from our modules: `from_torchvision` of a v2 model gives its
detections, and the state dict converts both ways.

Sizes chosen to keep the file at about 20 s on one thread: the v2 heads cost 4 convs of 256 channels per RoI
(box head at 7x7, mask head at 14x14), so images resized to 256 px (longest side at most 416), 100 proposals and
30 detections per image; two images per set (Penn-Fudan photos at half size, and two synthetic ones)."""

import pytest
import torch
from test_convert import assert_same_detections, pennfudan_photos, synthetic_images
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from maskrcnn.model import from_torchvision
from maskrcnn.model.convert import to_torchvision_state_dict


@pytest.fixture(scope="module")
def torchvision_v2():
    """A seeded random-init v2 (3 classes with background) in eval mode whose every BatchNorm has random running
    statistics and affine parameters, so that a conversion that dropped or misplaced one would change the
    detections."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3).eval()
    model.transform.min_size, model.transform.max_size = (256,), 416
    model.rpn._post_nms_top_n["testing"] = 100
    model.roi_heads.detections_per_img = 30
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
        for norm in norms:
            norm.running_mean.uniform_(-0.2, 0.2, generator=generator)
            norm.running_var.uniform_(0.5, 1.5, generator=generator)
            norm.weight.uniform_(0.8, 1.2, generator=generator)
            norm.bias.uniform_(-0.1, 0.1, generator=generator)
        # random-init predictors on v2's large head features: the class logits make background win everywhere
        # (no detection above 0.05), the deltas push boxes into slivers at the image border whose IoU a 0.01 px
        # rounding halves, and the mask logits saturate (paste ties at exactly 0.5); milder ones keep the
        # comparison about the model
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.1)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.01)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.05)
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(0.1)
    assert len(norms) == 53 + 8 + 4 + 4  # backbone, FPN (4 inner + 4 layer blocks), box head, mask head
    return model


@pytest.fixture(scope="module")
def photo_outputs(torchvision_v2):
    images = pennfudan_photos()
    if not images:
        pytest.skip("Penn-Fudan photos not found (set MASKRCNN_PENNFUDAN to the PennFudanPed folder)")
    with torch.no_grad():
        return images, torchvision_v2(images)


@pytest.fixture(scope="module")
def synthetic_outputs(torchvision_v2):
    images = synthetic_images()
    with torch.no_grad():
        return images, torchvision_v2(images)


def _check(torchvision_v2, outputs, cpu_speedups):
    ours = from_torchvision(torchvision_v2, cpu_speedups=cpu_speedups)
    images, expected = outputs
    with torch.no_grad():
        got = ours(images)
    # masks of 100+ pixels and all pixels together: tiny masks shift by a pixel where torchvision's paste rounds
    # a probability within 1e-7 of 0.5 (a 17-pixel mask at IoU 0.94 with bit-equal boxes and heads)
    assert_same_detections(expected, got, every_mask=False)


@pytest.mark.parametrize("cpu_speedups", [False, True], ids=["plain", "cpu-speedups-default"])
def test_v2_same_detections_on_photos(torchvision_v2, photo_outputs, cpu_speedups):
    _check(torchvision_v2, photo_outputs, cpu_speedups)


def test_v2_same_detections_on_synthetic_images(torchvision_v2, synthetic_outputs):
    _check(torchvision_v2, synthetic_outputs, cpu_speedups=True)


def test_v2_layers_are_read_from_the_weights(torchvision_v2):
    ours = from_torchvision(torchvision_v2.state_dict())
    assert len(ours.rpn.head.conv) == 2
    assert len(ours.box_head.convs) == 4 and ours.box_head.fc7 is None
    assert all(isinstance(norm, nn.BatchNorm2d) for norm in [*ours.box_head.norms, *ours.mask_head.norms])
    assert all(conv.bias is None for conv in [*ours.box_head.convs, *ours.mask_head.convs])
    assert isinstance(ours.backbone.fpn.inner_blocks[0][1], nn.BatchNorm2d)
    v1 = from_torchvision(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).state_dict())
    assert len(v1.rpn.head.conv) == 1 and len(v1.box_head.convs) == 0 and v1.box_head.fc7 is not None
    assert all(isinstance(norm, nn.Identity) for norm in v1.mask_head.norms)
    assert len(v1.backbone.fpn.inner_blocks[0]) == 1  # a conv without norm


def test_v2_state_dict_round_trip(torchvision_v2):
    back = to_torchvision_state_dict(from_torchvision(torchvision_v2.state_dict()).state_dict())
    reference = torchvision_v2.state_dict()
    assert set(back) == set(reference)
    for key, value in reference.items():
        assert torch.equal(back[key], value), key
    # and torchvision takes it back strictly
    maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3).load_state_dict(back)
