import pytest
import torch

from maskrcnn.structures import ImageBatch, check_targets, pad_per_image


def test_pad_per_image_uneven_and_empty():
    boxes = [torch.ones(2, 4), torch.zeros(0, 4), 3 * torch.ones(1, 4)]
    padded, valid = pad_per_image(boxes, pad_value=-1)
    assert padded.shape == (3, 2, 4)
    assert valid.tolist() == [[True, True], [False, False], [True, False]]
    assert padded[1].eq(-1).all() and padded[2, 0].eq(3).all() and padded[2, 1].eq(-1).all()


def test_pad_per_image_all_empty():
    padded, valid = pad_per_image([torch.zeros(0, 4), torch.zeros(0, 4)])
    assert padded.shape == (2, 0, 4) and valid.shape == (2, 0)


def test_scales():
    batch = ImageBatch(torch.zeros(2, 3, 64, 64), image_sizes=torch.tensor([[50.0, 60.0], [64.0, 32.0]]),
                       original_sizes=torch.tensor([[100.0, 120.0], [32.0, 32.0]]))
    assert len(batch) == 2
    assert batch.scales.tolist() == [[0.5, 0.5], [2.0, 1.0]]


def test_check_targets_names_the_target():
    good = {"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64), "masks": torch.zeros(1, 5, 6, dtype=torch.uint8)}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    check_targets([good, empty], [(5, 6), (3, 3)])
    check_targets([], [])
    with pytest.raises(ValueError, match="target 1: masks"):
        check_targets([good, good], [(5, 6), (6, 5)])
    with pytest.raises(ValueError, match="target 2: labels must be 1..K"):
        check_targets([good, empty, {**good, "labels": torch.zeros(1, dtype=torch.int64)}], [(5, 6)] * 3)
    with pytest.raises(ValueError, match="target 0: boxes must be float32"):
        check_targets([{**good, "boxes": torch.zeros(1, 4, dtype=torch.float64)}], [(5, 6)])
    with pytest.raises(ValueError, match="target 0: labels must be int64"):
        check_targets([{**good, "labels": torch.ones(2, dtype=torch.int64)}], [(5, 6)])
