import pytest
import torch

from maskrcnn.data.common import masks_to_boxes
from maskrcnn.data.synthetic import SHAPES, SyntheticShapes


def test_deterministic_by_seed_and_index_and_split():
    a = SyntheticShapes(num_images=5, seed=3)
    b = SyntheticShapes(num_images=5, seed=3)
    image_a, target_a = a[4]
    image_b, target_b = b[4]
    assert torch.equal(image_a, image_b) and torch.equal(target_a["masks"], target_b["masks"])
    assert torch.equal(a[4][0], image_a)  # a second read of the same index
    assert not torch.equal(a[3][0], image_a)
    assert not torch.equal(SyntheticShapes(num_images=5, seed=3, split="val")[4][0], image_a)
    assert not torch.equal(SyntheticShapes(num_images=5, seed=4)[4][0], image_a)


@pytest.mark.parametrize("size", [(64, 64), (40, 96), (100, 48)])
def test_masks_are_disjoint_visible_parts_with_tight_boxes(size):
    dataset = SyntheticShapes(num_images=20, image_size=size, num_classes=5, seed=1)
    assert dataset.class_names == list(SHAPES)
    for i in range(len(dataset)):
        image, target = dataset[i]
        masks, boxes, labels = target["masks"], target["boxes"], target["labels"]
        assert image.shape == (3, *size) and image.dtype == torch.uint8
        assert dataset.image_size(i) == size
        assert masks.dtype == torch.uint8 and masks.shape[1:] == size
        assert 1 <= len(labels) <= 4 and labels.dtype == torch.int64
        assert labels.min() >= 1 and labels.max() <= 5
        assert masks.flatten(1).sum(1).min() > 0
        assert masks.sum(0).max() <= 1  # occluded parts belong to the shape on top only
        # box = tight box of the visible mask, pixel edges: x2 - x1 counts the occupied columns
        columns = masks.any(dim=1)
        for k in range(len(labels)):
            occupied = columns[k].nonzero()[:, 0]
            assert boxes[k, 0] == occupied.min() and boxes[k, 2] == occupied.max() + 1
        assert torch.equal(boxes, masks_to_boxes(masks))
        assert target["image_id"] == i


def test_every_class_appears_and_shapes_are_large_enough():
    dataset = SyntheticShapes(num_images=30, num_classes=3, seed=0)
    labels = torch.cat([dataset[i][1]["labels"] for i in range(len(dataset))])
    assert set(labels.tolist()) == {1, 2, 3}
    boxes = torch.cat([dataset[i][1]["boxes"] for i in range(len(dataset))])
    sides = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values
    assert sides.max() <= 0.5 * 128 + 1 and sides.median() >= 0.1 * 128


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes must be 1..5"):
        SyntheticShapes(num_images=1, num_classes=6)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        SyntheticShapes(num_images=1, split="test")
    with pytest.raises(IndexError):
        SyntheticShapes(num_images=2)[2]
