import math

import pytest
import torch
from torchvision.models.detection.roi_heads import maskrcnn_loss

from maskrcnn.model.mask_head import MaskHead, stack_masks
from maskrcnn.model.poolers import LevelRoIAlign


def _head(aligned=True, num_classes=3, loss_weight=1.0):
    torch.manual_seed(0)
    return MaskHead(pooler=LevelRoIAlign(output_size=14, sampling_ratio=2, aligned=aligned), in_channels=4,
                    conv_channels=8, num_convs=4, num_classes=num_classes, loss_weight=loss_weight)


def test_layout_matches_torchvision():
    head = _head()
    assert [tuple(c.weight.shape) for c in head.convs] == [(8, 4, 3, 3)] + [(8, 8, 3, 3)] * 3
    assert tuple(head.deconv.weight.shape) == (8, 8, 2, 2)
    assert tuple(head.logits.weight.shape) == (4, 8, 1, 1)  # K + 1 channels, background included


def test_forward_selects_the_class_channel():
    head = _head()
    with torch.no_grad():
        head.logits.weight.zero_()
        head.logits.bias.copy_(torch.tensor([0.0, 10.0, 20.0, 30.0]))  # channel c outputs 10 c everywhere
    features = {f"p{k}": torch.randn(2, 4, 64 // 2**k, 64 // 2**k) for k in (2, 3, 4, 5)}
    rois = torch.tensor([[0.0, 0.0, 0.0, 20.0, 20.0], [1.0, 5.0, 5.0, 60.0, 40.0], [1.0, 1.0, 1.0, 9.0, 9.0]])
    logits = head(features, rois, torch.tensor([2, 1, 3]))
    assert logits.shape == (3, 28, 28)
    assert logits[:, 0, 0].tolist() == [20.0, 10.0, 30.0]


def test_under_cudnn_benchmark_the_convs_see_64_rois_and_the_results_are_unchanged(monkeypatch):
    head = _head()
    features = {f"p{k}": torch.randn(2, 4, 64 // 2**k, 64 // 2**k, requires_grad=True) for k in (2, 3, 4, 5)}
    rois = torch.tensor([[0.0, 0.0, 0.0, 20.0, 20.0], [1.0, 5.0, 5.0, 60.0, 40.0], [1.0, 1.0, 1.0, 9.0, 9.0]])
    labels = torch.tensor([2, 1, 3])
    seen = []
    head.convs[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))

    def run(benchmark):
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", benchmark)
        logits = head(features, rois, labels)
        gradients = torch.autograd.grad(logits.square().sum(), [*features.values(), head.convs[0].weight])
        return logits, gradients

    plain, plain_gradients = run(False)
    padded, padded_gradients = run(True)
    assert seen == [3, 64]  # 3 RoIs, then 61 zero rows after them
    assert padded.shape == (3, 28, 28)
    torch.testing.assert_close(padded, plain)
    for padded_gradient, plain_gradient in zip(padded_gradients, plain_gradients):
        torch.testing.assert_close(padded_gradient, plain_gradient)


def test_targets_are_the_matched_mask_cropped_to_the_box():
    head = _head(aligned=True)
    masks_image0 = torch.ones(2, 60, 50, dtype=torch.uint8)  # two GT of image 0: full masks, never the match
    masks_image1 = torch.zeros(1, 60, 50, dtype=torch.uint8)
    masks_image1[0, 20:48, 10:24] = 1  # the GT of image 1: the left half of the original box (10, 20, 38, 48)
    gt_valid = torch.tensor([[True, True], [True, False]])  # image 1: one GT and a padding row
    # image 1 was resized 2x in y and 3x in x: the proposal is the box in resized pixels, matched to its GT 0
    scales = torch.tensor([[1.0, 1.0], [2.0, 3.0]])
    rois = torch.tensor([[1.0, 30.0, 40.0, 114.0, 96.0]])
    target = head.targets(rois, torch.tensor([0]), gt_valid, [masks_image0, masks_image1], scales)
    expected = torch.zeros(1, 28, 28)
    expected[:, :, :14] = 1
    torch.testing.assert_close(target, expected)


def test_targets_binarised_and_partially_outside():
    head = _head(aligned=True)
    masks = torch.ones(1, 28, 28, dtype=torch.uint8)
    # box twice the mask: the right / bottom half lies outside the image and becomes 0
    target = head.targets(torch.tensor([[0.0, 0.0, 0.0, 56.0, 56.0]]), torch.tensor([0]), torch.tensor([[True]]),
                          [masks], torch.ones(1, 2))
    assert set(target.unique().tolist()) == {0.0, 1.0}
    assert target[0, :13, :13].min().item() == 1.0 and target[0, 15:, :].max().item() == 0.0


def test_loss_by_hand_and_empty():
    logits = torch.zeros(2, 28, 28, requires_grad=True)
    loss = _head().loss(logits, torch.ones(2, 28, 28))
    assert loss.item() == pytest.approx(math.log(2))
    empty = _head().loss(torch.zeros(0, 28, 28, requires_grad=True), torch.zeros(0, 28, 28))
    assert empty.item() == 0.0 and empty.requires_grad


def test_loss_weight_scales_the_loss():
    # logit 0 against target 1 and logit log 3 (probability 3/4) against target 0: BCE log 2 and log 4
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    targets = torch.tensor([[[1.0, 0.0]]])
    head = _head(loss_weight=2.5)
    assert head.loss(logits, targets).item() == pytest.approx(2.5 * (math.log(2.0) + math.log(4.0)) / 2)


def test_stack_masks_pads_uneven_images():
    stacked = stack_masks([torch.ones(2, 4, 6, dtype=torch.uint8), torch.zeros(0, 8, 3, dtype=torch.uint8),
                           torch.ones(1, 5, 5, dtype=torch.bool)])
    assert stacked.shape == (3, 1, 8, 6) and stacked.dtype == torch.uint8
    assert stacked[:2].sum().item() == 2 * 24 and stacked[2].sum().item() == 25


def test_loss_equals_torchvision_maskrcnn_loss_on_the_same_sampled_rois():
    """Same RoIs, same matched GT, same logits: torchvision's `maskrcnn_loss` and ours agree. GT masks are full or
    empty, so that torchvision's soft targets (roi_align of the mask, not binarised) are 0 / 1 as ours."""
    head = _head(aligned=False, num_classes=3)
    torch.manual_seed(0)
    masks_per_image = [torch.stack([torch.ones(64, 80), torch.zeros(64, 80), torch.ones(64, 80)]).to(torch.uint8),
                       torch.stack([torch.zeros(64, 80), torch.ones(64, 80)]).to(torch.uint8)]
    labels_per_image = [torch.tensor([1, 2, 3]), torch.tensor([3, 1])]
    gt_valid = torch.tensor([[True, True, True], [True, True, False]])
    # foreground RoIs of both images, positives grouped by image as the box head's sample gives them
    image = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    matched_gt = torch.tensor([2, 0, 1, 2, 1, 0, 1])
    xy = torch.rand(7, 2) * 30
    boxes = torch.cat([xy, xy + torch.rand(7, 2) * 30 + 5], dim=1)
    rois = torch.cat([image[:, None].float(), boxes], dim=1)
    labels = torch.cat([labels_per_image[i][m][None] for i, m in zip(image.tolist(), matched_gt.tolist())])
    full_logits = torch.randn(7, 4, 28, 28)

    targets = head.targets(rois, matched_gt, gt_valid, masks_per_image, torch.ones(2, 2))
    ours = head.loss(full_logits[torch.arange(7), labels], targets)
    expected = maskrcnn_loss(full_logits, [boxes[image == b] for b in range(2)], masks_per_image,
                             labels_per_image, [matched_gt[image == b] for b in range(2)])
    torch.testing.assert_close(ours, expected)
