"""What keeps a large photo's prediction in bounded memory gives the same bits as the code it replaced: the
backbone's pyramid (each trunk map let go once used, the top-down sum in place without autograd) against
torchvision's `FeaturePyramidNetwork.forward`, and the transform's in-place normalisation against `(x - mean) /
std`. The memory itself is measured by benchmarks/predict_memory.py."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from maskrcnn.model.backbone import LEVELS, build_backbone
from maskrcnn.model.transform import ImageTransform


def torchvision_pyramid(backbone, x):
    """The pyramid as torchvision's FPN computes it from the same modules."""
    return OrderedDict(zip(LEVELS, backbone.fpn(backbone.body(x)).values()))


@pytest.mark.parametrize("fpn_norm", ["none", "group"])
def test_the_pyramid_is_torchvisions_bit_for_bit(fpn_norm):
    torch.manual_seed(0)
    backbone = build_backbone(depth=18, fpn_norm=fpn_norm).eval()
    x = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        expected, got = torchvision_pyramid(backbone, x), backbone(x)
    assert list(got) == list(LEVELS) and all(torch.equal(got[k], expected[k]) for k in LEVELS)
    # with autograd (training): the same outputs and gradients, the sum out of place
    backbone.train()
    grads = []
    for forward in (torchvision_pyramid, lambda module, images: module(images)):
        backbone.zero_grad()
        images = x.clone().requires_grad_()
        sum(level.square().sum() for level in forward(backbone, images).values()).backward()
        grads.append([images.grad] + [p.grad for p in backbone.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 1 and all(torch.equal(a, b) for a, b in zip(*grads))


def test_normalisation_in_place_is_the_same():
    transform = ImageTransform(min_size=64, max_size=96, size_divisible=32, fixed_canvas=None,
                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    images = torch.rand(2, 3, 40, 50)
    given = images.clone()
    expected = (images - transform.image_mean) / transform.image_std
    assert torch.equal(transform._normalise(images), expected)
    assert torch.equal(images, given)  # its input is left as it was
