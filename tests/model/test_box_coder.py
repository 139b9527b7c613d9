import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskrcnn.model.box_coder import BoxCoder

torchvision_box_coder = pytest.importorskip("torchvision.models.detection._utils").BoxCoder


def test_encode_by_hand():
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    anchor = torch.tensor([0.0, 0.0, 10.0, 20.0])  # centre (5, 10), size 10 x 20
    gt = torch.tensor([2.0, 4.0, 22.0, 24.0])  # centre (12, 14), size 20 x 20
    deltas = coder.encode(gt, anchor)
    expected = torch.tensor([10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 5 * math.log(1.0)])
    torch.testing.assert_close(deltas, expected)


def test_decode_clamps_before_exp():
    coder = BoxCoder()
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    decoded = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), box)
    # exp(log(1000/16)) * 16 = 1000 wide, centred on 8
    torch.testing.assert_close(decoded, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))
    assert torch.isfinite(decoded).all()


def test_broadcasts_over_leading_dims():
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 15.0]])  # (P, 4)
    deltas = torch.randn(2, 3, 2, 4) * 0.5  # (B, C, P, 4)
    decoded = coder.decode(deltas, boxes)
    assert decoded.shape == (2, 3, 2, 4)
    torch.testing.assert_close(decoded[1, 2], coder.decode(deltas[1, 2], boxes))


def test_matches_torchvision_numerics():
    torch.manual_seed(0)
    xy = torch.rand(50, 2) * 100
    boxes = torch.cat([xy, xy + torch.rand(50, 2) * 50 + 1], dim=1)
    gxy = torch.rand(50, 2) * 100
    gt = torch.cat([gxy, gxy + torch.rand(50, 2) * 50 + 1], dim=1)
    ours = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    theirs = torchvision_box_coder((10.0, 10.0, 5.0, 5.0))
    assert torch.equal(ours.encode(gt, boxes), theirs.encode_single(gt, boxes))
    deltas = torch.randn(50, 4) * 3
    assert torch.equal(ours.decode(deltas, boxes), theirs.decode_single(deltas, boxes))


coordinate = st.floats(min_value=-500, max_value=500, allow_nan=False, width=32)
size = st.floats(min_value=1, max_value=400, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(x=coordinate, y=coordinate, w=size, h=size, gx=coordinate, gy=coordinate, gw=size, gh=size,
       weights=st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]))
def test_round_trip(x, y, w, h, gx, gy, gw, gh, weights):
    coder = BoxCoder(weights=weights, clamp=math.log(1000.0))  # ratios up to 400 stay inside the clamp
    box = torch.tensor([x, y, x + w, y + h], dtype=torch.float64)
    gt = torch.tensor([gx, gy, gx + gw, gy + gh], dtype=torch.float64)
    torch.testing.assert_close(coder.decode(coder.encode(gt, box), box), gt, rtol=1e-9, atol=1e-6)
