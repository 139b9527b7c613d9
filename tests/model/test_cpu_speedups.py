import copy
import dataclasses
import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import box_iou, roi_align

from maskrcnn.config import BackboneConfig, BoxHeadConfig, MaskHeadConfig, ModelConfig, TransformConfig
from maskrcnn.model import build_model, cpu_speedups
from maskrcnn.model.cpu_speedups import MeasuredChoice, SpeedConv2d, cpu_roi_align, nchw_copy, optimize_for_cpu


@pytest.fixture
def torch_threads():
    """Sets torch's CPU thread count for one test and restores it afterwards."""
    threads = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(threads)


def _nhwc(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).float().contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------ measured choice


def test_measured_choice_takes_the_faster_path_once_and_remembers_it():
    clock = itertools.count()  # every timer call advances one second...
    slow_calls = []

    def fast():
        return "fast result"

    def slow():
        slow_calls.append(1)
        next(clock)  # ...and "slow" costs one extra second
        return "slow result"

    choice = MeasuredChoice(timer=lambda: float(next(clock)))
    assert choice("shape A", {"slow": slow, "fast": fast}) == "fast result"
    assert choice.choices == {"shape A": "fast"}
    calls_while_measuring = len(slow_calls)
    assert calls_while_measuring == 2  # one untimed warm-up, one timed call
    assert choice("shape A", {"slow": slow, "fast": fast}) == "fast result"
    assert len(slow_calls) == calls_while_measuring  # remembered: the slow path is not run again
    choice("shape B", {"fast": fast, "slow": slow})  # a new key is measured anew
    assert choice.choices == {"shape A": "fast", "shape B": "fast"}


class _Forced:
    """Stands in for the measured choice: always takes one path, and records the keys it was asked for."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys = []

    def __call__(self, key, candidates):
        self.keys.append(key)
        return candidates[self.name]()


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("stride, bias", [(1, True), (2, False)])
def test_conv_gradients_equal_conv2d_whichever_layout_is_chosen(monkeypatch, layout, stride, bias):
    torch.manual_seed(0)
    reference = nn.Conv2d(6, 8, 3, stride=stride, padding=1, bias=bias).double()
    holder = nn.Sequential(nn.Conv2d(6, 8, 3, stride=stride, padding=1, bias=bias))
    optimize_for_cpu(holder, nhwc_roi_align=False)
    conv = holder[0]
    conv.load_state_dict(reference.state_dict())
    forced = _Forced(layout)
    monkeypatch.setattr(cpu_speedups, "weight_grad_layout", forced)
    x = _nhwc(2, 6, 11, 13).requires_grad_()
    x_reference = x.detach().double().requires_grad_()
    y = conv(x)
    y_reference = reference(x_reference)
    torch.testing.assert_close(y.double(), y_reference, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(y.shape, dtype=torch.float64)
    (y * upstream.float()).sum().backward()
    (y_reference * upstream).sum().backward()
    assert len(forced.keys) == 1  # the weight gradient went through the measured choice
    torch.testing.assert_close(x.grad.double(), x_reference.grad, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(conv.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-4)


def test_convs_outside_cpu_float32_training_take_no_measured_path(monkeypatch):
    holder = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    optimize_for_cpu(holder, nhwc_roi_align=False)
    forced = _Forced("nchw")
    monkeypatch.setattr(cpu_speedups, "weight_grad_layout", forced)
    x = _nhwc(1, 4, 8, 8)
    holder(x.contiguous()).sum().backward()  # NCHW input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert holder(x).dtype == torch.bfloat16
    holder.double()(x.double()).sum().backward()  # float64
    assert forced.keys == []


# ------------------------------------------------------------------------------------ layout copies


def test_nchw_copy_keeps_values_and_passes_the_gradient_through():
    x = _nhwc(2, 3, 4, 5).requires_grad_()
    y = nchw_copy(x)
    assert y.is_contiguous() and not x.is_contiguous()
    assert torch.equal(y, x.detach().contiguous())
    weights = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)  # d/dx sum(x * w) = w


# ------------------------------------------------------------------------------------ RoIAlign


def _rois(count: int, images: int = 2) -> torch.Tensor:
    """RoIs on a 20 x 24 map at spatial scale 0.25, some reaching past its edges (and some past -1 pixel)."""
    xy = torch.rand(count, 2) * 90 - 15
    return torch.cat([torch.randint(0, images, (count, 1)).float(), xy, xy + torch.rand(count, 2) * 30 + 1], dim=1)


def test_cpu_roi_align_hand_worked_values():
    feature = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    whole = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]])
    # aligned: one sample per bin at the centre of each pixel, so the 2 x 2 output is the map itself
    assert torch.equal(cpu_roi_align(feature, whole, 2, sampling_ratio=1, aligned=True), feature)
    # one bin, one sample at the map's centre (0.5, 0.5): the mean of the four pixels
    assert torch.equal(cpu_roi_align(feature, whole, 1, sampling_ratio=1, aligned=True), torch.full((1, 1, 1, 1), 1.5))
    # not aligned: the sample falls at (1, 1), the last pixel on both axes, whose value it takes
    assert torch.equal(cpu_roi_align(feature, whole, 1, sampling_ratio=1, aligned=False), torch.full((1, 1, 1, 1), 3.0))
    # four samples in one bin: (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75) average to (0.5, 0.5)
    assert torch.allclose(cpu_roi_align(feature, whole, 1, sampling_ratio=2, aligned=True), torch.tensor(1.5))
    # a box more than one pixel outside the map samples nothing
    far = torch.tensor([[0.0, 10.0, 10.0, 12.0, 12.0]])
    assert torch.equal(cpu_roi_align(feature, far, 1, sampling_ratio=1, aligned=True), torch.zeros(1, 1, 1, 1))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_cpu_roi_align_equals_torchvision_forward_and_backward(torch_threads, threads, dtype, aligned, layout):
    torch_threads(threads)
    torch.manual_seed(0)
    feature = _nhwc(2, 4, 20, 24).to(dtype)
    feature = (feature if layout == "nhwc" else feature.contiguous()).requires_grad_()
    rois = _rois(40).to(dtype)
    grad = torch.randn(40, 4, 5, 5, dtype=dtype)
    expected = roi_align(feature, rois, 5, spatial_scale=0.25, sampling_ratio=2, aligned=aligned)
    (expected_grad,) = torch.autograd.grad(expected, feature, grad)
    got = cpu_roi_align(feature, rois, 5, spatial_scale=0.25, sampling_ratio=2, aligned=aligned)
    (got_grad,) = torch.autograd.grad(got, feature, grad)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert expected.abs().sum() > 0 and (expected == 0).any()  # samples inside, and RoIs outside the map
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]  # the same sums in another order
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got_grad, expected_grad, rtol=tolerance, atol=tolerance)


def test_cpu_roi_align_with_adaptive_sampling_or_no_rois_is_torchvisions():
    torch.manual_seed(0)
    feature = _nhwc(2, 4, 20, 24)
    rois = _rois(7)
    for sampling_ratio in (0, -1):  # a sample count per RoI: torchvision's op itself
        assert torch.equal(cpu_roi_align(feature, rois, 5, spatial_scale=0.25, sampling_ratio=sampling_ratio),
                           roi_align(feature, rois, 5, spatial_scale=0.25, sampling_ratio=sampling_ratio))
    assert cpu_roi_align(feature, rois[:0], 5, spatial_scale=0.25, sampling_ratio=2).shape == (0, 4, 5, 5)


def test_cpu_roi_align_under_bf16_autocast_pools_the_bf16_map_as_it_is_at_inference(torch_threads):
    torch_threads(2)
    torch.manual_seed(0)
    feature = _nhwc(2, 4, 20, 24).bfloat16()
    rois = _rois(7)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), _AtenOps() as ops:
        got = cpu_roi_align(feature, rois, 5, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    expected = roi_align(feature.float(), rois, 5, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    assert got.dtype == torch.bfloat16 and "roi_align" not in ops.names
    # bf16 weights and a bf16 result: within bf16's rounding (8 bits) of the float32 pooling of the same map
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_cpu_roi_align_sums_the_gradient_of_a_bf16_map_in_float32(torch_threads):
    """Every pixel's gradient is a sum over the bins that sample it: summed in bf16 it drifts (1.5 % relative error
    on 512 RoIs), summed in float32 and rounded once it is within bf16's rounding of the float32 gradient."""
    torch_threads(2)
    torch.manual_seed(0)
    feature = _nhwc(1, 8, 20, 24)
    rois = _rois(300, images=1)
    grad = torch.randn(300, 8, 5, 5)
    reference = feature.clone().requires_grad_()
    roi_align(reference, rois, 5, spatial_scale=0.25, sampling_ratio=2, aligned=True).backward(grad)
    bf16 = feature.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cpu_roi_align(bf16, rois, 5, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    got.backward(grad.to(got.dtype))
    assert got.dtype == torch.float32 and bf16.grad.dtype == torch.bfloat16
    error = (bf16.grad.float() - reference.grad).norm() / reference.grad.norm()
    assert error < 0.005  # bf16 input rounding (0.4 % per value) and one rounding of the sum


# ------------------------------------------------------------------------------------ whole model


def _tiny_config(**changes) -> ModelConfig:
    values = dict(num_classes=2, backbone=BackboneConfig(depth=18, fpn_channels=32),
                  transform=TransformConfig(min_size=None, max_size=None),
                  box_head=BoxHeadConfig(representation_size=64, batch_size_per_image=64),
                  mask_head=MaskHeadConfig(conv_channels=16), cpu_speedups=False)
    values.update(changes)
    return ModelConfig(**values)


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, as after training."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)


def _images():
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=generator) * 0.3, torch.rand(3, 80, 112, generator=generator) * 0.3]
    images[0][:, 10:60, 12:50] = 0.9
    images[1][:, 30:70, 10:100] = 0.6
    return images


def _assert_same_detections(got, expected):
    """Equal detections up to float rounding, each expected row paired with the row of the same label whose box
    overlaps it most: two rows whose scores differ by less than the rounding may swap places in the score order
    (rows 19 and 20 of 100 did in one run with one thread)."""
    for mine, theirs in zip(got, expected):
        assert mine["boxes"].shape == theirs["boxes"].shape and theirs["boxes"].shape[0] > 0
        same_label = theirs["labels"][:, None] == mine["labels"][None, :]
        pair = (box_iou(theirs["boxes"], mine["boxes"]) * same_label).argmax(dim=1)  # (D,) index into mine
        assert pair.unique().numel() == pair.numel()
        torch.testing.assert_close(mine["boxes"][pair], theirs["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(mine["scores"][pair], theirs["scores"], atol=1e-4, rtol=1e-4)
        assert torch.equal(mine["labels"][pair], theirs["labels"])
        torch.testing.assert_close(mine["masks"][pair], theirs["masks"], atol=1e-3, rtol=1e-3)


@pytest.fixture
def plain_and_fast():
    torch.manual_seed(0)
    plain = build_model(_tiny_config())
    _randomise_batchnorm(plain)
    return plain, optimize_for_cpu(copy.deepcopy(plain))


def test_optimize_for_cpu_keeps_the_state_dict_detections_and_losses(plain_and_fast):
    plain, fast = plain_and_fast
    assert list(fast.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key
    images = _images()
    with torch.no_grad():
        _assert_same_detections(fast.eval()(images), plain.eval()(images))
    targets = [{"boxes": torch.tensor([[12.0, 10, 50, 60]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 96, 96, dtype=torch.uint8)},
               {"boxes": torch.tensor([[10.0, 30, 100, 70]]), "labels": torch.tensor([2]),
                "masks": torch.zeros(1, 80, 112, dtype=torch.uint8)}]
    losses = []
    for model in (plain.train(), fast.train()):
        torch.manual_seed(1)  # the same RoI sampling
        losses.append(model(images, targets))
    for key in losses[0]:
        torch.testing.assert_close(losses[1][key], losses[0][key], atol=1e-4, rtol=1e-4)


def test_weights_changed_after_an_eval_are_used_by_the_next_eval(plain_and_fast):
    plain, fast = plain_and_fast
    images = _images()
    with torch.no_grad():
        fast.eval()(images)
        # changes while in eval mode, both ways a user makes them: in place, and by load_state_dict
        for model in (plain, fast):
            model.backbone.body.conv1.weight.mul_(1.5)
            model.backbone.body.bn1.running_var.mul_(2.0)
        changed = copy.deepcopy(plain.state_dict())
        changed["backbone.body.layer1.0.bn1.weight"].mul_(0.5)
        for model in (plain, fast):
            model.load_state_dict(changed)
        _assert_same_detections(fast(images), plain.eval()(images))


class _AtenOps(TorchDispatchMode):
    """Records the name of every aten op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a device other than the CPU, as a GPU is
def test_off_the_cpu_eval_runs_the_norm_and_the_plain_roi_align(device):
    torch.manual_seed(0)
    model = optimize_for_cpu(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nhwc_roi_align=False)
    model.eval().to(device)
    feature = torch.randn(2, 4, 20, 24).contiguous(memory_format=torch.channels_last).to(device)
    with torch.no_grad(), _AtenOps() as ops:
        model(torch.randn(1, 3, 8, 8).to(device))
        cpu_roi_align(feature, _rois(3).to(device), 5, spatial_scale=0.25, sampling_ratio=2)
    norms = [name for name in ops.names if "batch_norm" in name]
    bags = [name for name in ops.names if "embedding_bag" in name]
    if device == "cpu":  # the norm folded into the conv; the map pooled as a table of rows
        assert norms == [] and "roi_align" not in ops.names and len(bags) == 1
    else:
        assert len(norms) == 1 and "roi_align" in ops.names and bags == []


def test_build_model_applies_the_speed_layer_when_configured():
    fast = build_model(_tiny_config(cpu_speedups=True))
    plain = build_model(dataclasses.replace(_tiny_config()))
    assert any(type(m) is SpeedConv2d for m in fast.modules())
    assert not any(type(m) is SpeedConv2d for m in plain.modules())
    assert fast.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
