import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TorchvisionRPNHead

from maskrcnn.model.anchors import AnchorGenerator
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.matcher import BalancedSampler, Matcher
from maskrcnn.model.rpn import RPN, RPNHead
from maskrcnn.structures import ImageBatch

SIZES, RATIOS = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
C = 8


def make_rpn(*, sizes=SIZES, ratios=RATIOS, pre=1000, post=1000, batch_size_per_image=256,
             positive_fraction=0.5, score_thresh=0.0):
    return RPN(head=RPNHead(in_channels=C, num_anchors=len(ratios)),
               anchor_generator=AnchorGenerator(sizes=sizes, aspect_ratios=ratios), box_coder=BoxCoder(),
               matcher=Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True),
               sampler=BalancedSampler(batch_size_per_image=batch_size_per_image,
                                       positive_fraction=positive_fraction),
               pre_nms_top_n_train=pre, pre_nms_top_n_test=pre, post_nms_top_n_train=post,
               post_nms_top_n_test=post, nms_thresh=0.7, min_size=1e-3, score_thresh=score_thresh)


def make_torchvision_rpn(*, pre=1000, post=1000, batch_size_per_image=256, positive_fraction=0.5,
                         score_thresh=0.0):
    return RegionProposalNetwork(
        TorchvisionAnchorGenerator(tuple((s,) for s in SIZES), (RATIOS,) * len(SIZES)),
        TorchvisionRPNHead(C, len(RATIOS)), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
        pre_nms_top_n={"training": pre, "testing": pre}, post_nms_top_n={"training": post, "testing": post},
        nms_thresh=0.7, score_thresh=score_thresh)


def make_inputs(canvas, image_sizes, seed=0):
    """A batch on `canvas` and random p2..p6 features of the sizes a ResNet-FPN gives (ceil division)."""
    generator = torch.Generator().manual_seed(seed)
    features = {f"p{level}": torch.randn(len(image_sizes), C, -(-canvas[0] // 2**level), -(-canvas[1] // 2**level),
                                         generator=generator) for level in range(2, 7)}
    sizes = torch.tensor(image_sizes, dtype=torch.float32)
    batch = ImageBatch(tensor=torch.zeros(len(image_sizes), 3, *canvas), image_sizes=sizes, original_sizes=sizes)
    return batch, features


def spread_head_weights(head, seed=0):
    """Head weights with a wide spread of objectness, so that few scores tie (tie order is unspecified)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def assert_same_up_to_ties(boxes, scores, reference):
    """Ours (boxes f32[n, 4], scores f32[n] sorted) equal `reference` f32[n, 4] except for the order of boxes with
    exactly equal scores."""
    assert boxes.shape == reference.shape
    start = 0
    for count in torch.unique_consecutive(scores, return_counts=True)[1].tolist():
        ours = sorted(map(tuple, boxes[start:start + count].tolist()))
        theirs = sorted(map(tuple, reference[start:start + count].tolist()))
        assert ours == theirs, f"proposals {start}..{start + count} differ"
        start += count


def test_head_names_and_init_match_torchvision():
    head = RPNHead(in_channels=C, num_anchors=3)
    reference = TorchvisionRPNHead(C, 3)
    assert {k: v.shape for k, v in head.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert list(head.state_dict()) == ["conv.0.0.weight", "conv.0.0.bias", "cls_logits.weight", "cls_logits.bias",
                                       "bbox_pred.weight", "bbox_pred.bias"]
    for name, parameter in head.named_parameters():
        if name.endswith("bias"):
            assert parameter.abs().sum() == 0, name
        else:
            assert 0.005 < parameter.std() < 0.015, name
    logits, deltas = head([torch.rand(2, C, 4, 6), torch.rand(2, C, 2, 3)])
    assert [tuple(x.shape) for x in logits] == [(2, 3, 4, 6), (2, 3, 2, 3)]
    assert [tuple(x.shape) for x in deltas] == [(2, 12, 4, 6), (2, 12, 2, 3)]


@pytest.mark.parametrize("pre, post, score_thresh", [(1000, 1000, 0.0), (50, 30, 0.0), (200, 100, 0.4)])
def test_proposals_equal_torchvision(pre, post, score_thresh):
    rpn = make_rpn(pre=pre, post=post, score_thresh=score_thresh).eval()
    reference = make_torchvision_rpn(pre=pre, post=post, score_thresh=score_thresh).eval()
    spread_head_weights(rpn.head)
    reference.head.load_state_dict(rpn.head.state_dict())
    image_sizes = [(250, 310), (180, 150)]  # two sizes on one canvas: clipping is per image
    batch, features = make_inputs((256, 320), image_sizes)
    with torch.no_grad():
        proposals, scores, valid, losses = rpn(batch, features)
        expected, _ = reference(ImageList(batch.tensor, image_sizes), dict(features))
    assert losses == {}
    assert proposals.shape[:2] == scores.shape == valid.shape
    for i, (h, w) in enumerate(image_sizes):
        n = int(valid[i].sum())
        assert valid[i, :n].all() and not valid[i, n:].any()  # valid rows first
        assert n <= post and n == expected[i].shape[0]
        assert torch.all(scores[i, :n - 1] >= scores[i, 1:n])
        assert_same_up_to_ties(proposals[i, :n], scores[i, :n], expected[i])
        assert proposals[i, :n, 0::2].max() <= w and proposals[i, :n, 1::2].max() <= h
        assert scores[i, n:].abs().sum() == 0 and proposals[i, n:].abs().sum() == 0
        if score_thresh:
            assert scores[i, :n].min() >= score_thresh


def test_batching_does_not_mix_images():
    rpn = make_rpn(pre=300, post=200).eval()
    spread_head_weights(rpn.head, seed=1)
    batch, features = make_inputs((256, 320), [(250, 310), (120, 200)], seed=1)
    _, other_features = make_inputs((256, 320), [(250, 310), (256, 320)], seed=2)
    other_features = {k: torch.stack([f[0], other_features[k][1]]) for k, f in features.items()}
    other_sizes = torch.tensor([[250.0, 310.0], [256.0, 320.0]])
    other_batch = ImageBatch(tensor=batch.tensor, image_sizes=other_sizes, original_sizes=other_sizes)
    with torch.no_grad():
        proposals, scores, valid, _ = rpn(batch, features)
        other_proposals, other_scores, other_valid, _ = rpn(other_batch, other_features)
    # image 0 is the same in both batches: its proposals cannot depend on its neighbour
    assert torch.equal(valid[0], other_valid[0])
    assert torch.equal(scores[0], other_scores[0])
    assert torch.equal(proposals[0], other_proposals[0])
    assert not torch.equal(proposals[1], other_proposals[1])
    # the neighbour's proposals are clipped to its own size
    assert proposals[1, :, 0::2].max() <= 200 and proposals[1, :, 1::2].max() <= 120
    assert other_proposals[1, :, 0::2].max() > 200


def constant_head(rpn, logit, deltas):
    """Head whose outputs ignore the features: every anchor gets objectness `logit` and the given deltas."""
    with torch.no_grad():
        for parameter in rpn.head.parameters():
            parameter.zero_()
        rpn.head.cls_logits.bias.fill_(logit)
        rpn.head.bbox_pred.bias.copy_(torch.tensor(deltas).repeat(rpn.head.cls_logits.out_channels))


def test_losses_by_hand():
    # one level, stride 32 on a 64x64 canvas, one square anchor of 32 per location, centres (0,0) (32,0) (0,32)
    # (32,32); the GT box equals the last anchor and touches none of the others: 1 positive, 3 negatives
    rpn = make_rpn(sizes=(32,), ratios=(1.0,)).train()
    constant_head(rpn, logit=0.5, deltas=[0.1, 0.0, 0.0, 0.0])
    sizes = torch.tensor([[64.0, 64.0]])
    batch = ImageBatch(tensor=torch.zeros(1, 3, 64, 64), image_sizes=sizes, original_sizes=sizes)
    features = {"p": torch.rand(1, C, 2, 2)}
    gt_boxes, gt_valid = torch.tensor([[[16.0, 16.0, 48.0, 48.0]]]), torch.tensor([[True]])
    _, _, _, losses = rpn(batch, features, gt_boxes, gt_valid)
    # BCE of logit x is softplus(-x) with label 1 and softplus(x) with label 0
    expected_cls = (math.log1p(math.exp(-0.5)) + 3 * math.log1p(math.exp(0.5))) / 4
    # smooth L1 with beta 1/9 of dx = 0.1 (< beta): 0.5 * 0.1^2 / (1/9) = 0.045, over 4 sampled anchors
    expected_box = 0.5 * 0.1**2 * 9 / 4
    assert losses["loss_rpn_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    assert losses["loss_rpn_box"].item() == pytest.approx(expected_box, rel=1e-5)


def test_losses_equal_torchvision_when_every_anchor_is_sampled():
    # a budget larger than the anchors makes sampling deterministic: all positives and all negatives
    kwargs = {"batch_size_per_image": 10**6, "positive_fraction": 1.0}
    rpn = make_rpn(**kwargs).train()
    reference = make_torchvision_rpn(**kwargs).train()
    spread_head_weights(rpn.head, seed=2)
    reference.head.load_state_dict(rpn.head.state_dict())
    image_sizes = [(128, 160), (100, 90)]
    batch, features = make_inputs((128, 160), image_sizes, seed=2)
    boxes_per_image = [torch.tensor([[10.0, 20.0, 70.0, 60.0], [80.0, 30.0, 150.0, 120.0]]),
                       torch.tensor([[5.0, 5.0, 40.0, 90.0]])]
    gt_boxes = torch.zeros(2, 2, 4)
    gt_boxes[0], gt_boxes[1, :1] = boxes_per_image[0], boxes_per_image[1]
    gt_valid = torch.tensor([[True, True], [True, False]])
    _, _, _, losses = rpn(batch, features, gt_boxes, gt_valid)
    _, expected = reference(ImageList(batch.tensor, image_sizes), dict(features),
                            [{"boxes": b} for b in boxes_per_image])
    torch.testing.assert_close(losses["loss_rpn_cls"], expected["loss_objectness"])
    torch.testing.assert_close(losses["loss_rpn_box"], expected["loss_rpn_box_reg"])


@pytest.mark.parametrize("gt_count", [0, 1])
def test_training_losses_finite_and_connected(gt_count):
    rpn = make_rpn(pre=100, post=50).train()
    batch, features = make_inputs((64, 96), [(64, 90), (50, 96)])
    features = {k: f.requires_grad_() for k, f in features.items()}
    gt_boxes = torch.tensor([[[8.0, 8.0, 40.0, 56.0]], [[0.0, 0.0, 0.0, 0.0]]])[:, :gt_count]
    gt_valid = torch.tensor([[True], [False]])[:, :gt_count]  # image 1 never has GT
    proposals, scores, valid, losses = rpn(batch, features, gt_boxes, gt_valid)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    assert all(torch.isfinite(loss) for loss in losses.values())
    assert not proposals.requires_grad and not scores.requires_grad
    assert proposals.shape == (2, 50, 4) and valid.any(dim=1).all()
    if gt_count == 0:
        assert losses["loss_rpn_box"].item() == 0.0
    else:
        assert losses["loss_rpn_box"].item() > 0.0
    sum(losses.values()).backward()
    assert rpn.head.cls_logits.weight.grad.abs().sum() > 0
    assert rpn.head.bbox_pred.weight.grad is not None  # connected to the graph even with no positive anchor
    assert (rpn.head.bbox_pred.weight.grad.abs().sum() > 0) == (gt_count > 0)
    assert all(torch.isfinite(f.grad).all() for f in features.values())


def test_training_requires_ground_truth():
    rpn = make_rpn().train()
    batch, features = make_inputs((64, 64), [(64, 64)])
    with pytest.raises(ValueError, match="gt_boxes"):
        rpn(batch, features)


def test_no_proposal_survives():
    # objectness probability 0.5 everywhere, threshold above it: every candidate is removed before NMS
    rpn = make_rpn(pre=20, post=10, score_thresh=0.6).eval()
    constant_head(rpn, logit=0.0, deltas=[0.0, 0.0, 0.0, 0.0])
    batch, features = make_inputs((64, 64), [(64, 64), (40, 50)])
    proposals, scores, valid, _ = rpn(batch, features)
    assert proposals.shape == (2, 10, 4) and scores.shape == valid.shape == (2, 10)
    assert not valid.any() and proposals.abs().sum() == 0
