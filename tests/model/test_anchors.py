import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from maskrcnn.model.anchors import AnchorGenerator


def test_small_grid_by_hand():
    generator = AnchorGenerator(sizes=(32,), aspect_ratios=(0.5, 1.0, 2.0))
    # canvas 8x8, feature 2x2: stride 4, anchor centres (0,0) (4,0) (0,4) (4,4), row-major
    (anchors,) = generator((8, 8), [(2, 2)], "cpu")
    # ratio 0.5 (h/w): w = 32 * sqrt(2) = 45.25, h = 22.63; halves 22.63 / 11.31 round to 23 / 11
    cell = torch.tensor([[-23.0, -11.0, 23.0, 11.0],
                         [-16.0, -16.0, 16.0, 16.0],
                         [-11.0, -23.0, 11.0, 23.0]])
    shifts = torch.tensor([[0.0, 0, 0, 0], [4, 0, 4, 0], [0, 4, 0, 4], [4, 4, 4, 4]])
    expected = (shifts[:, None, :] + cell[None]).reshape(-1, 4)
    assert anchors.dtype == torch.float32
    assert torch.equal(anchors, expected)
    assert anchors[3].tolist() == [-19.0, -11.0, 27.0, 11.0]  # location (0, 1), first ratio


def test_stride_is_integer_division_per_dimension():
    generator = AnchorGenerator(sizes=(16,), aspect_ratios=(1.0,))
    # canvas 64x96, a 1x2 level (as p6 of a tiny image): strides 64 // 1 = 64 in y, 96 // 2 = 48 in x
    (anchors,) = generator((64, 96), [(1, 2)], "cpu")
    assert anchors.tolist() == [[-8.0, -8.0, 8.0, 8.0], [40.0, -8.0, 56.0, 8.0]]
    # 100 // 33 = 3: a canvas that is not a multiple of the level size is floored, as torchvision does
    (anchors,) = generator((100, 100), [(1, 33)], "cpu")
    assert anchors[1].tolist() == [-5.0, -8.0, 11.0, 8.0]


def test_equals_torchvision_on_fpn_levels():
    sizes, ratios = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
    canvas = (96, 160)
    feature_sizes = [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    ours = AnchorGenerator(sizes=sizes, aspect_ratios=ratios)(canvas, feature_sizes, "cpu")
    reference = TorchvisionAnchorGenerator(tuple((s,) for s in sizes), (ratios,) * 5)
    features = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
    (theirs,) = reference(ImageList(torch.zeros(1, 3, *canvas), [canvas]), features)
    assert [a.shape[0] for a in ours] == [h * w * 3 for h, w in feature_sizes]
    assert torch.equal(torch.cat(ours), theirs)


def test_cached_per_shape():
    generator = AnchorGenerator(sizes=(32, 64), aspect_ratios=(1.0,))
    first = generator((64, 64), [(16, 16), (8, 8)], "cpu")
    assert generator((64, 64), [(16, 16), (8, 8)], "cpu") is first
    other = generator((64, 96), [(16, 24), (8, 12)], "cpu")
    assert other is not first and other[0].shape == (16 * 24, 4)
    assert generator.num_anchors_per_location == 1


def test_level_count_mismatch_is_an_error():
    generator = AnchorGenerator(sizes=(32, 64), aspect_ratios=(1.0,))
    with pytest.raises(ValueError, match="3 feature levels"):
        generator((64, 64), [(16, 16), (8, 8), (4, 4)], "cpu")
