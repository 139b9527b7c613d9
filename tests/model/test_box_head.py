import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import fastrcnn_loss

from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.box_head import BoxHead, RoISample, proposal_rois
from maskrcnn.model.matcher import BalancedSampler, Matcher
from maskrcnn.model.poolers import LevelRoIAlign


def _head(num_classes=2, batch_size_per_image=8, positive_fraction=0.25, score_thresh=0.05, detections=100):
    torch.manual_seed(0)
    return BoxHead(pooler=LevelRoIAlign(output_size=7, sampling_ratio=2, aligned=True), in_channels=4,
                   representation_size=16, num_classes=num_classes,
                   matcher=Matcher(high_threshold=0.5, low_threshold=0.5, allow_low_quality_matches=False),
                   sampler=BalancedSampler(batch_size_per_image=batch_size_per_image,
                                           positive_fraction=positive_fraction),
                   box_coder=BoxCoder(weights=(10.0, 10.0, 5.0, 5.0), clamp=math.log(1000.0 / 16)),
                   score_thresh=score_thresh, nms_thresh=0.5, detections_per_img=detections)


def _features(batch=2, channels=4, canvas=(128, 128)):
    return {f"p{k}": torch.randn(batch, channels, canvas[0] // 2**k, canvas[1] // 2**k) for k in (2, 3, 4, 5)}


def test_sample_by_hand():
    head = _head(batch_size_per_image=4, positive_fraction=0.5)
    proposals = torch.tensor([[[0.0, 0.0, 10.0, 10.0],  # IoU 1 with GT 0
                               [0.0, 0.0, 10.0, 20.0],  # IoU 0.5 with GT 0: foreground (>=)
                               [50.0, 50.0, 60.0, 60.0],  # background
                               [0.0, 0.0, 10.0, 10.0]]])  # padding
    valid = torch.tensor([[True, True, True, False]])
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    gt_labels = torch.tensor([[2]])
    torch.manual_seed(0)
    sample = head.sample(proposals, valid, gt_boxes, gt_labels, torch.tensor([[True]]))
    # candidates: 3 valid proposals + the GT itself; 3 foreground but at most 2 sampled, then 1 + ... background
    assert sample.num_positive == 2
    assert sample.rois.shape == (3, 5)
    assert sample.labels.tolist() == [2, 2, 0]
    assert sample.rois[2, 1:].tolist() == [50.0, 50.0, 60.0, 60.0]
    assert sample.regression_targets.shape == (2, 4)
    for roi, target in zip(sample.rois[:2, 1:], sample.regression_targets):
        torch.testing.assert_close(target, head.box_coder.encode(gt_boxes[0, 0], roi))


def test_losses_with_no_gt_and_one_gt():
    head = _head()
    features = _features(batch=1)
    proposals = torch.tensor([[[0.0, 0.0, 30.0, 30.0], [40.0, 40.0, 90.0, 80.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    losses_per_case = []
    for gt_boxes, gt_labels in [(torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.int64)),
                                (torch.tensor([[[0.0, 0.0, 30.0, 32.0]]]), torch.tensor([[1]]))]:
        sample = head.sample(proposals, valid, gt_boxes, gt_labels, torch.ones(gt_labels.shape, dtype=torch.bool))
        logits, deltas = head(features, sample.rois)
        losses = head.loss(logits, deltas, sample)
        assert set(losses) == {"loss_box_cls", "loss_box_reg"}
        total = losses["loss_box_cls"] + losses["loss_box_reg"]
        assert torch.isfinite(total)
        head.zero_grad()
        total.backward()
        assert head.fc6.weight.grad is not None and head.bbox_pred.weight.grad is not None
        losses_per_case.append(losses)
    no_gt, one_gt = losses_per_case
    # no GT: both proposals are background, nothing to regress; near-uniform logits over 3 classes
    assert no_gt["loss_box_reg"].item() == 0.0
    assert no_gt["loss_box_cls"].item() == pytest.approx(math.log(3), abs=0.05)
    # one GT: proposal 0 (IoU 30*30 / 30*32) and the GT itself are positives; proposal 0 needs a y-shift
    assert one_gt["loss_box_reg"].item() > 0
    empty = head.sample(proposals[:, :0], valid[:, :0], torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.int64),
                        torch.zeros(1, 0, dtype=torch.bool))
    logits, deltas = head(features, empty.rois)
    losses = head.loss(logits, deltas, empty)
    assert losses["loss_box_cls"].item() == 0.0 and losses["loss_box_cls"].requires_grad


def test_loss_values_by_hand():
    head = _head(num_classes=1)
    sample_rois = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0], [0.0, 20.0, 20.0, 30.0, 30.0]])

    sample = RoISample(rois=sample_rois, labels=torch.tensor([1, 0]), matched_gt=torch.zeros(2, dtype=torch.int64),
                       regression_targets=torch.tensor([[1.0, 0.0, 0.0, 0.0]]), num_positive=1)
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # uniform: cross-entropy log 2
    deltas = torch.zeros(2, 8)
    losses = head.loss(logits, deltas, sample)
    assert losses["loss_box_cls"].item() == pytest.approx(math.log(2))
    # smooth L1 (beta 1/9) of |1 - 0| = 1 - 0.5 / 9, divided by the 2 sampled RoIs
    assert losses["loss_box_reg"].item() == pytest.approx((1 - 0.5 / 9) / 2)


def test_predict_on_hand_made_logits():
    head = _head(num_classes=2, detections=2)
    proposals = torch.tensor([[[10.0, 10.0, 50.0, 50.0],
                               [11.0, 10.0, 50.0, 50.0],  # overlaps the first: suppressed for class 1
                               [60.0, 60.0, 90.0, 200.0]],  # clipped to the image height 100
                              [[0.0, 0.0, 20.0, 20.0],
                               [0.0, 0.0, 30.0, 30.0],  # a padding slot: never a detection
                               [0.0, 0.0, 0.0, 0.0]]])  # (B=2, P=3, 4)
    proposal_valid = torch.tensor([[True, True, True], [True, False, False]])
    big = 10.0
    logits = torch.tensor([[0.0, big, 0.0],  # class 1 for sure
                           [0.0, big - 1, 0.0],  # class 1, lower score
                           [0.0, 0.0, big],  # class 2
                           [big, 0.0, 0.0],  # background: every class under 0.05
                           [0.0, big, 0.0],  # padding slot, confident
                           [0.0, big, 0.0]])  # padding slot, confident
    deltas = torch.zeros(6, 12)
    sizes = torch.tensor([[100.0, 120.0], [40.0, 40.0]])
    detections = head.predict(logits, deltas, proposals, proposal_valid, sizes)
    assert detections.boxes.shape == (2, 2, 4)
    assert detections.valid.tolist() == [[True, True], [False, False]]
    assert detections.labels.tolist() == [[1, 2], [0, 0]]
    torch.testing.assert_close(detections.boxes[0], torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 100.0]]))
    p = 1 / (1 + 2 * math.exp(-big))
    torch.testing.assert_close(detections.scores[0], torch.tensor([p, p]))
    assert detections.scores[1].tolist() == [0.0, 0.0] and detections.boxes[1].eq(0).all()


def test_predict_keeps_top_detections_per_image():
    head = _head(num_classes=1, detections=3)
    xs = torch.arange(5, dtype=torch.float32) * 30  # 5 disjoint boxes per image
    boxes = torch.stack([xs, xs, xs + 20, xs + 20], dim=1)
    proposals = torch.stack([boxes, boxes])  # (2, 5, 4)
    logits = torch.stack([torch.zeros(10), torch.arange(10, dtype=torch.float32)], dim=1)
    detections = head.predict(logits, torch.zeros(10, 8), proposals, torch.ones(2, 5, dtype=torch.bool),
                              torch.tensor([[200.0, 200.0]] * 2))
    assert detections.valid.all()
    # highest scores first: proposals 4, 3, 2 of each image
    torch.testing.assert_close(detections.boxes[:, :, 0], torch.tensor([[120.0, 90.0, 60.0]] * 2))
    assert (detections.scores[:, :-1] >= detections.scores[:, 1:]).all()


def test_proposal_rois_are_every_slot_image_by_image():
    proposals = torch.arange(16, dtype=torch.float32).reshape(2, 2, 4)
    rois = proposal_rois(proposals)
    assert rois[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert rois[2, 1:].tolist() == [8.0, 9.0, 10.0, 11.0]


def test_loss_equals_torchvision_fastrcnn_loss_on_the_same_sampled_rois():
    head = _head(num_classes=3, batch_size_per_image=16, positive_fraction=0.5)
    torch.manual_seed(1)
    xy = torch.rand(2, 30, 2) * 80
    proposals = torch.cat([xy, xy + torch.rand(2, 30, 2) * 40 + 4], dim=2)  # (B, P, 4)
    gt_boxes = torch.tensor([[[10.0, 10, 60, 50], [50, 40, 110, 100]], [[20, 30, 70, 90], [0, 0, 0, 0]]])
    gt_labels = torch.tensor([[1, 3], [2, 0]])
    gt_valid = torch.tensor([[True, True], [True, False]])
    sample = head.sample(proposals, torch.ones(2, 30, dtype=torch.bool), gt_boxes, gt_labels, gt_valid)
    assert 0 < sample.num_positive < sample.rois.shape[0]
    class_logits = torch.randn(sample.rois.shape[0], 4)
    box_deltas = torch.randn(sample.rois.shape[0], 16)

    # torchvision's inputs: labels and encoded targets of every sampled RoI, grouped by image, in its own coder
    image = sample.rois[:, 0].long()
    matched_boxes = gt_boxes[image, sample.matched_gt]  # (R, 4); background rows: any box, unused
    coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    order = torch.argsort(image, stable=True)
    labels_per_image = [sample.labels[order][image[order] == b] for b in range(2)]
    targets_per_image = [coder.encode_single(matched_boxes[order][image[order] == b],
                                             sample.rois[order][image[order] == b, 1:]) for b in range(2)]
    expected_cls, expected_reg = fastrcnn_loss(class_logits[order], box_deltas[order], labels_per_image,
                                               targets_per_image)
    losses = head.loss(class_logits, box_deltas, sample)
    torch.testing.assert_close(losses["loss_box_cls"], expected_cls)
    torch.testing.assert_close(losses["loss_box_reg"], expected_reg)
