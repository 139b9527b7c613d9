import torch

from maskrcnn.model.box_ops import clip_boxes, nms_mask, top_per_image


def test_clip_boxes_to_each_image():
    boxes = torch.tensor([[[-5.0, -1.0, 70.0, 30.0]], [[-5.0, -1.0, 70.0, 30.0]]])  # (B=2, 1, 4)
    sizes = torch.tensor([[20.0, 64.0], [40.0, 50.0]])  # (h, w)
    assert clip_boxes(boxes, sizes[:, None, :]).tolist() == [[[0.0, 0.0, 64.0, 20.0]], [[0.0, 0.0, 50.0, 30.0]]]


def test_nms_mask_suppresses_inside_a_group_only():
    # image 0: boxes 0 and 1 overlap with IoU 81/100 = 0.81; box 2 is the same as box 0 but in another group
    box = [0.0, 0.0, 10.0, 10.0]
    boxes = torch.tensor([[box, [1.0, 1.0, 10.0, 10.0], box], [box, box, box]])  # (B=2, N=3, 4)
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.5, 0.6, 0.4]])
    groups = torch.tensor([[0, 0, 1], [2, 2, 3]])
    selectable = torch.tensor([[True, True, True], [True, True, False]])  # image 1, box 2 filtered out
    keep = nms_mask(boxes, scores, groups, selectable, iou_threshold=0.5)
    # image 1: boxes 0 and 1 are identical in group 2, the better one (box 1, 0.6) survives
    assert keep.tolist() == [[True, False, True], [False, True, False]]
    # IoU 0.81 is not above 0.9: both survive
    assert nms_mask(boxes, scores, groups, selectable, iou_threshold=0.9)[0].tolist() == [True, True, True]


def test_nms_mask_with_nothing_selectable():
    boxes = torch.rand(2, 3, 4)
    keep = nms_mask(boxes, torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.bool),
                    0.5)
    assert keep.shape == (2, 3) and not keep.any()


def test_top_per_image_pads_short_rows_and_zeroes_them():
    boxes = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    keep = torch.tensor([[True, True, True], [False, True, False]])
    labels = torch.tensor([[3, 4, 5], [6, 7, 8]])
    valid, top_boxes, top_scores, top_labels = top_per_image(boxes, scores, keep, count=4, values=(labels,))
    assert valid.tolist() == [[True, True, True, False], [True, False, False, False]]  # more rows than candidates
    assert top_labels.tolist() == [[4, 5, 3, 0], [7, 0, 0, 0]]
    torch.testing.assert_close(top_scores, torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.2, 0.0, 0.0, 0.0]]))
    assert top_boxes[0, 0].tolist() == [4.0, 5.0, 6.0, 7.0] and top_boxes[1, 0].tolist() == [16.0, 17.0, 18.0, 19.0]
    assert top_boxes[0, 3].eq(0).all() and top_boxes[1, 1:].eq(0).all()


def _many_pairs(pairs_per_image: int):
    """2 images of `pairs_per_image` groups, each a pair at the same place in every group: [0, 0, 10, 10] and
    [1, 0, 11, 10] (IoU 90 / 110 = 0.82), the first scored higher except in every third pair; the last pair of
    each image not selectable. Returns boxes, scores, groups, selectable ([2, N], N = 2 * pairs) and the
    expected keep mask: the better box of every selectable pair."""
    N = 2 * pairs_per_image
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]]).repeat(pairs_per_image, 1).expand(2, N, 4)
    pair = torch.arange(N) // 2  # (N,)
    second_better = pair % 3 == 0
    first = torch.arange(N) % 2 == 0
    scores = torch.where(first ^ second_better, 0.9, 0.8).expand(2, N)
    groups = torch.arange(2)[:, None] * pairs_per_image + pair[None]  # (2, N): one group per pair and image
    selectable = (pair < pairs_per_image - 1).expand(2, N)
    expected = (first ^ second_better) & selectable
    return boxes, scores, groups, selectable, expected


def test_nms_mask_of_thousands_of_groups_eagerly_and_as_exported(monkeypatch):
    """5,996 candidates, above the 4,000 where torchvision's batched_nms runs one NMS per group (the eager path),
    and the single NMS of groups moved apart that an exported graph holds: both keep the better box of each pair
    and nothing across groups is suppressed (every group's boxes lie on the same place)."""
    boxes, scores, groups, selectable, expected = _many_pairs(1500)
    assert selectable.sum() == 5996
    assert torch.equal(nms_mask(boxes, scores, groups, selectable, 0.5), expected)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(nms_mask(boxes, scores, groups, selectable, 0.5), expected)
