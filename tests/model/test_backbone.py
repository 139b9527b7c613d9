import urllib.error

import pytest
import torch
from torch import nn
from torchvision import models
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.model.backbone import build_backbone
from maskrcnn.model.pretrained import WeightsError

LEVEL_SHAPES = {"p2": (16, 16), "p3": (8, 8), "p4": (4, 4), "p5": (2, 2), "p6": (1, 1)}  # 64x64 / 4..64


@pytest.mark.parametrize("depth", [18, 34])  # 50 in test_names_and_outputs_match_torchvision
def test_levels_and_strides(depth):
    backbone = build_backbone(depth=depth, out_channels=32).eval()
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 64, 64))
    assert list(features) == list(LEVEL_SHAPES)
    assert backbone.out_channels == 32
    for name, (h, w) in LEVEL_SHAPES.items():
        assert features[name].shape == (2, 32, h, w), name
    # from scratch: trainable BatchNorm everywhere in the trunk, every parameter trains
    assert all(p.requires_grad for p in backbone.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())


def test_resnet101_shapes():
    backbone = build_backbone(depth=101, out_channels=16).eval()
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape) for f in features.values()] == [(1, 16, 16, 24), (1, 16, 8, 12), (1, 16, 4, 6),
                                                          (1, 16, 2, 3), (1, 16, 1, 2)]


def test_names_and_outputs_match_torchvision():
    ours = build_backbone(depth=50, norm="frozen").eval()
    theirs = resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        features = ours(x)
        for a, b in zip(features.values(), theirs(x).values()):
            assert torch.equal(a, b)
    assert {name: tuple(f.shape[-2:]) for name, f in features.items()} == LEVEL_SHAPES
    assert features["p2"].shape[1] == ours.out_channels == 256
    # frozen layout: the same parameters train as in torchvision (trainable_layers=3)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]


def test_group_norm_from_scratch():
    backbone = build_backbone(depth=18, norm="group", out_channels=32)
    norms = [m for m in backbone.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in backbone.modules())
    assert any(name.startswith("fpn.") for name, m in backbone.named_modules() if isinstance(m, nn.GroupNorm))
    assert backbone(torch.rand(1, 3, 64, 64))["p6"].shape == (1, 32, 1, 1)


def trainable_stages(backbone):
    return sorted({name.split(".")[1] for name, p in backbone.named_parameters()
                   if p.requires_grad and name.startswith("body.")})


def test_resnet_weights_from_local_file(tmp_path):
    resnet = models.resnet18(weights=None)
    with torch.no_grad():
        resnet.bn1.running_mean.uniform_()  # a value the default init cannot produce
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)

    backbone = build_backbone(depth=18, weights=str(path))
    assert torch.equal(backbone.body.conv1.weight, resnet.conv1.weight)
    assert torch.equal(backbone.body.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    assert torch.equal(backbone.body.bn1.running_mean, resnet.bn1.running_mean)
    assert isinstance(backbone.body.bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    # trainable_layers=3: stem and layer1 frozen, layer2..4 and the FPN train
    assert trainable_stages(backbone) == ["layer2", "layer3", "layer4"]
    assert not backbone.body.conv1.weight.requires_grad
    assert all(p.requires_grad for p in backbone.fpn.parameters())
    assert trainable_stages(build_backbone(depth=18, weights=str(path), trainable_layers=0)) == []
    assert trainable_stages(build_backbone(depth=18, weights=str(path), trainable_layers=5)) == \
        ["conv1", "layer1", "layer2", "layer3", "layer4"]


def test_whole_backbone_state_dict_from_local_file(tmp_path):
    source = build_backbone(depth=18, norm="frozen", out_channels=16).eval()
    with torch.no_grad():
        source.fpn.layer_blocks[0][0].bias.fill_(0.5)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    loaded = build_backbone(depth=18, weights=str(path), out_channels=16).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(source(x).values(), loaded(x).values()):
            assert torch.equal(a, b)


def test_bad_weight_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_backbone(depth=18, weights=str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    torch.save({"head.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="other.pt: neither a ResNet"):
        build_backbone(depth=18, weights=str(other))
    deeper = tmp_path / "resnet34.pt"
    torch.save(models.resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(ValueError, match="resnet34.pt: weights do not fit"):
        build_backbone(depth=18, weights=str(deeper))


def test_imagenet_download_failure_says_what_to_do(monkeypatch, tmp_path):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match="local path"):
        build_backbone(depth=18, weights="imagenet")


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        build_backbone(depth=152)
    with pytest.raises(ValueError, match="trainable_layers"):
        build_backbone(depth=18, trainable_layers=6)
    with pytest.raises(ValueError, match="norm"):
        build_backbone(depth=18, norm="layer")
    with pytest.raises(ValueError, match="norm 'group' is for training from scratch"):
        build_backbone(depth=18, norm="group", weights="imagenet")
