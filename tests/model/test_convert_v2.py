"""torchvision's `maskrcnn_resnet50_fpn_v2` built from our modules: `from_torchvision` of a v2 model gives its
detections, the state dict converts both ways, and the v2 layers train.

Sizes chosen to keep the file at about 20 s on one thread: the v2 heads cost 4 convs of 256 channels per RoI
(box head at 7x7, mask head at 14x14), so images resized to 256 px (longest side at most 416), 100 proposals and
30 detections per image; two images per set (Penn-Fudan photos at half size, and two synthetic ones)."""

import pytest
import torch
from test_convert import assert_same_detections, pennfudan_photos, synthetic_images
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from maskrcnn.model import build_model, from_torchvision
from maskrcnn.model.convert import to_torchvision_state_dict
from maskrcnn.model.mask_head import MaskHead
from maskrcnn.model.poolers import LevelRoIAlign


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


def test_a_batchnorm_mask_head_in_training_sees_no_padding_rows(monkeypatch):
    """Under cudnn.benchmark the mask head pads its RoIs to a multiple of 64 with zero rows; those would enter the
    batch statistics of a training BatchNorm, so with one it pads only in eval mode."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    torch.manual_seed(0)
    head = MaskHead(pooler=LevelRoIAlign(output_size=14, sampling_ratio=2, aligned=True), in_channels=4,
                    conv_channels=8, num_convs=2, num_classes=2, norm_layer=nn.BatchNorm2d)
    seen = []
    head.convs[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    features = {f"p{k}": torch.randn(1, 4, 64 // 2**k, 64 // 2**k) for k in (2, 3, 4, 5)}
    rois = torch.tensor([[0.0, 0.0, 0.0, 20.0, 20.0], [0.0, 5.0, 5.0, 60.0, 40.0], [0.0, 1.0, 1.0, 9.0, 9.0]])
    head.train()(features, rois, torch.tensor([1, 2, 1]))
    head.eval()(features, rois, torch.tensor([1, 2, 1]))
    assert seen == [3, 64]


def test_the_v2_layout_trains(tiny_config, tmp_path):
    """Our tiny model with v2's layers (2-conv RPN, convs + BatchNorm + 1 FC box head, BatchNorm mask head and FPN):
    a training step gives finite losses and moves the heads' batch statistics."""
    cfg = tiny_config(tmp_path, "model.rpn.num_convs=2", "model.box_head.num_convs=2", "model.box_head.num_fcs=1",
                      "model.box_head.conv_channels=32", "model.box_head.norm=batch", "model.mask_head.norm=batch",
                      "model.backbone.fpn_norm=batch").model
    model = build_model(cfg).train()
    assert isinstance(model.backbone.fpn.layer_blocks[0][1], nn.BatchNorm2d)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:50] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = model(images, [target, target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(loss) for loss in losses.values())
    assert model.box_head.convs[1].weight.grad is not None and model.mask_head.convs[0].weight.grad is not None
    assert not torch.equal(model.box_head.norms[0].running_mean, torch.zeros(32))
    assert not torch.equal(model.mask_head.norms[0].running_var, torch.ones(32))
