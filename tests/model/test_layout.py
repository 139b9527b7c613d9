import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.model.layout import LayoutConv2d, nchw_copy, use_layout_convs


def _nhwc(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).float().contiguous(memory_format=torch.channels_last)


def test_nchw_copy_keeps_values_and_passes_the_gradient_through():
    x = _nhwc(2, 3, 4, 5).requires_grad_()
    y = nchw_copy(x)
    assert y.is_contiguous() and not x.is_contiguous()
    assert torch.equal(y, x.detach().contiguous())
    weights = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)  # d/dx sum(x * w) = w


def test_nchw_copy_returns_an_nchw_tensor_itself():
    x = torch.rand(1, 3, 4, 5)
    assert nchw_copy(x) is x


@pytest.mark.parametrize("stride, channels, size, bias", [
    (2, 4, (9, 12), True),  # strided 3x3: always the NCHW weight gradient
    (1, 256, (100, 100), False),  # 256 channels at 10^4 positions: FPN / RPN at a large level
], ids=["strided", "wide"])
def test_layout_conv_equals_conv2d_in_value_and_gradients(stride, channels, size, bias):
    torch.manual_seed(0)
    reference = nn.Conv2d(channels, 8, 3, stride=stride, padding=1, bias=bias).double()
    conv = LayoutConv2d.from_conv(nn.Conv2d(channels, 8, 3, stride=stride, padding=1, bias=bias))
    conv.load_state_dict(reference.state_dict())
    conv.to(memory_format=torch.channels_last)
    x = _nhwc(2, channels, *size).requires_grad_()
    x_reference = x.detach().double().requires_grad_()

    y = conv(x)
    assert type(y.grad_fn).__name__ == "_NCHWWeightGradConvBackward"
    assert y.is_contiguous(memory_format=torch.channels_last)
    y_reference = reference(x_reference)
    torch.testing.assert_close(y.double(), y_reference, rtol=1e-4, atol=1e-4)
    upstream = torch.randn(y.shape, dtype=torch.float64)
    (y * upstream.float()).sum().backward()
    (y_reference * upstream).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_reference.grad, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(conv.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-3)


def test_layout_conv_is_conv2d_elsewhere():
    conv = LayoutConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1)).to(memory_format=torch.channels_last)
    x = _nhwc(1, 4, 8, 8)
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"  # stride 1, few channels
    strided = LayoutConv2d.from_conv(nn.Conv2d(4, 4, 3, stride=2, padding=1)).to(memory_format=torch.channels_last)
    assert type(strided(x).grad_fn).__name__ == "_NCHWWeightGradConvBackward"
    assert type(strided(x.contiguous()).grad_fn).__name__ == "ConvolutionBackward0"  # NCHW input
    with torch.no_grad():
        assert strided(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert strided(x).dtype == torch.bfloat16


def test_use_layout_convs_swaps_3x3_convs_and_shares_their_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, stride=2)))
    weights = [model[0].weight, model[1][1].weight]
    keys = list(model.state_dict())
    use_layout_convs(model)
    assert type(model[0]) is LayoutConv2d and type(model[1][1]) is LayoutConv2d
    assert type(model[1][0]) is nn.Conv2d  # 1x1: NHWC is fastest for all its passes
    assert model[0].weight is weights[0] and model[1][1].weight is weights[1]
    assert list(model.state_dict()) == keys
