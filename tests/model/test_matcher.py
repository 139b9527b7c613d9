import torch

from maskrcnn.model.matcher import BalancedSampler, Matcher


def test_thresholds_by_hand():
    matcher = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=False)
    # one image, 2 GT, 5 anchors
    iou = torch.tensor([[[0.9, 0.5, 0.1, 0.0, 0.29],
                         [0.2, 0.6, 0.7, 0.3, 0.0]]])
    idx, label = matcher(iou, torch.tensor([[True, True]]))
    assert idx.tolist() == [[0, 1, 1, 1, 0]]
    assert label.dtype == torch.int8
    # 0.9 fg; 0.6 ignored; 0.7 fg (>=); 0.3 ignored (not < low); 0.29 bg
    assert label.tolist() == [[1, -1, 1, -1, 0]]


def test_low_quality_keeps_all_ties():
    matcher = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)
    iou = torch.tensor([[[0.4, 0.4, 0.1, 0.0],
                         [0.0, 0.5, 0.2, 0.0]]])
    idx, label = matcher(iou, torch.tensor([[True, True]]))
    # GT0's best 0.4 at anchors 0 and 1; GT1's best 0.5 at anchor 1; anchor 1 keeps its own best GT (1)
    assert label.tolist() == [[1, 1, 0, 0]]
    assert idx.tolist() == [[0, 1, 1, 0]]


def test_padded_gt_and_image_without_gt():
    matcher = Matcher(high_threshold=0.5, low_threshold=0.5, allow_low_quality_matches=True)
    iou = torch.tensor([[[0.6, 0.1], [0.9, 0.9]],  # image 0: GT1 is padding
                        [[0.9, 0.8], [0.7, 0.7]]])  # image 1: no valid GT
    idx, label = matcher(iou, torch.tensor([[True, False], [False, False]]))
    assert label.tolist() == [[1, 0], [0, 0]]
    assert idx.tolist() == [[0, 0], [0, 0]]


def test_no_gt_rows_at_all():
    matcher = Matcher(high_threshold=0.5, low_threshold=0.5, allow_low_quality_matches=False)
    idx, label = matcher(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool))
    assert idx.shape == (2, 3) and label.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_sampler_counts():
    torch.manual_seed(0)
    sampler = BalancedSampler(batch_size_per_image=8, positive_fraction=0.25)
    labels = torch.tensor([
        [1] * 5 + [0] * 20 + [-1] * 5,  # many of both: 2 pos + 6 neg
        [1] * 1 + [0] * 20 + [-1] * 9,  # few positives: 1 pos + 7 neg
        [1] * 10 + [0] * 3 + [-1] * 17,  # few negatives: 2 pos + 3 neg
        [-1] * 30,  # nothing to sample
    ], dtype=torch.int8)
    pos, neg = sampler(labels)
    assert pos.sum(1).tolist() == [2, 1, 2, 0]
    assert neg.sum(1).tolist() == [6, 7, 3, 0]
    assert not (pos & neg).any()
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()


def test_sampler_is_random():
    sampler = BalancedSampler(batch_size_per_image=4, positive_fraction=0.5)
    labels = torch.tensor([[1] * 50 + [0] * 50], dtype=torch.int8)
    torch.manual_seed(1)
    first, _ = sampler(labels)
    torch.manual_seed(2)
    second, _ = sampler(labels)
    assert not torch.equal(first, second)
