"""Box head of Faster R-CNN with FPN: RoI sampling, multi-level RoIAlign, 2 FC layers (or torchvision v2's 4 convs
with BatchNorm and 1 FC), class scores and class-specific box deltas, losses and batched inference.

Shape letters: B images, G GT boxes per image (padded), P proposals per image (padded), A = P + G candidate
RoIs per image in training, R RoIs of the whole batch (flattened), K foreground classes (K + 1 with background),
C feature channels, S pooled size, D detections per image (padded).

Every step runs on the whole batch at once: one [B, G, A] IoU, one sampling call, one RoIAlign per FPN level
over the RoIs of all images (boxes as [R, 5] with the image index), one NMS with group id
image_index * (K + 1) + class and one `topk` per image (`box_ops`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.box_ops import clip_boxes, nms_mask, top_per_image
from maskrcnn.model.matcher import IGNORED, BalancedSampler, Matcher, pairwise_iou
from maskrcnn.model.poolers import LevelRoIAlign, image_index_rois


@dataclass
class RoISample:
    """RoIs sampled for the box and mask losses of a batch, positives first.

    Attributes:
        rois: f32[R, 5] (image index, x1, y1, x2, y2) in resized-image pixels; rows [:num_positive] foreground.
        labels: i64[R] class of the matched GT box for foreground rows, 0 for background rows.
        matched_gt: i64[R] index (into G) of the matched GT box of each foreground row; 0 for background rows.
        regression_targets: f32[num_positive, 4] encoded deltas of the foreground rows.
        num_positive: number of foreground rows.
    """

    rois: Tensor
    labels: Tensor
    matched_gt: Tensor
    regression_targets: Tensor
    num_positive: int


@dataclass
class Detections:
    """Detections of a batch, padded to D per image, sorted by score within each image.

    Attributes:
        boxes: f32[B, D, 4] xyxy, zeros where not valid: resized-image pixels from `BoxHead.predict`,
            original-image pixels from `MaskRCNN.detect`.
        scores: f32[B, D] class probabilities (0 where not valid).
        labels: i64[B, D] classes 1..K (0 where not valid).
        valid: bool[B, D], a prefix of every row.
        masks: f32[B, D, M, M] mask probabilities relative to each box (`MaskRCNN.detect`), None from the box head.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    valid: Tensor
    masks: Tensor | None = None


class BoxHead(nn.Module):
    """Two-FC box head (FPN paper, sec. 4.2), or convs + FC (torchvision v2: 4 convs with BatchNorm, 1 FC), with its
    predictor, losses and inference.

    Layer names follow torchvision v1 (`fc6`, `fc7`, `cls_score`, `bbox_pred`) so weights convert one to one; the
    convs are `convs.<i>` with their norms `norms.<i>` (nn.Identity without a norm: no parameters).

    Args:
        pooler: RoIAlign over the FPN levels (7x7).
        in_channels: C, channels of the pooled features.
        representation_size: width of the FC layers (1024).
        num_classes: K foreground classes; the predictor has K + 1 logits and (K + 1) * 4 deltas.
        matcher: proposal-to-GT matcher (IoU 0.5, no low-quality matches).
        sampler: RoI sampler (512 per image, 25 % foreground).
        box_coder: delta coder with weights (10, 10, 5, 5).
        score_thresh: detections with class probability below this are dropped.
        nms_thresh: IoU of the per-class NMS.
        detections_per_img: D, detections kept per image.
        min_box_size: detections narrower or shorter than this (pixels) are dropped.
        num_convs: 3x3 conv (+ norm) + ReLU layers on the pooled features before the FC layers (v2: 4).
        conv_channels: channels of those convs.
        num_fcs: FC layers, 1 (`fc6`) or 2 (`fc6`, `fc7`).
        norm_layer: normalisation after each conv, e.g. nn.BatchNorm2d (v2); None: none, the convs have a bias.
    """

    def __init__(self, *, pooler: LevelRoIAlign, in_channels: int, representation_size: int, num_classes: int,
                 matcher: Matcher, sampler: BalancedSampler, box_coder: BoxCoder, score_thresh: float,
                 nms_thresh: float, detections_per_img: int, min_box_size: float = 1e-2, num_convs: int = 0,
                 conv_channels: int = 256, num_fcs: int = 2,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.pooler = pooler
        self.num_classes = num_classes
        self.matcher = matcher
        self.sampler = sampler
        self.box_coder = box_coder
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.min_box_size = min_box_size
        if num_fcs not in (1, 2):
            raise ValueError(f"BoxHead: num_fcs must be 1 or 2, got {num_fcs}")
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if index == 0 else conv_channels, conv_channels, 3, padding=1,
                      bias=norm_layer is None) for index in range(num_convs))
        self.norms = nn.ModuleList(nn.Identity() if norm_layer is None else norm_layer(conv_channels)
                                   for _ in range(num_convs))
        for conv in self.convs:  # torchvision's FastRCNNConvFCHead init
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        pooled_channels = conv_channels if num_convs else in_channels
        self.fc6 = nn.Linear(pooled_channels * pooler.output_size ** 2, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size) if num_fcs == 2 else None
        self.cls_score = nn.Linear(representation_size, num_classes + 1)
        self.bbox_pred = nn.Linear(representation_size, (num_classes + 1) * 4)
        # small predictor init (Detectron2): uniform class probabilities and near-identity boxes at the start
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, features: dict[str, Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits and deltas of RoIs f32[R, 5] -> (f32[R, K+1], f32[R, (K+1)*4])."""
        x = self.pooler(features, rois)  # (R, C, S, S)
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        x = F.relu(self.fc6(x.flatten(1)))  # (R, C*S*S) -> (R, representation_size)
        if self.fc7 is not None:
            x = F.relu(self.fc7(x))
        return self.cls_score(x), self.bbox_pred(x)

    @torch.no_grad()
    def sample(self, proposals: Tensor, proposal_valid: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
               gt_valid: Tensor) -> RoISample:
        """Matches proposals (plus the GT boxes themselves) to GT and samples the RoIs of the loss.

        Args:
            proposals: f32[B, P, 4] detached, resized-image pixels.
            proposal_valid: bool[B, P].
            gt_boxes: f32[B, G, 4]; gt_labels: i64[B, G]; gt_valid: bool[B, G] (G may be 0).
        Returns:
            RoISample with positives of all images first.
        """
        # GT boxes join the candidates so that every GT has at least one perfect positive (torchvision, Detectron2)
        candidates = torch.cat([proposals, gt_boxes], dim=1)  # (B, A, 4), A = P + G
        candidate_valid = torch.cat([proposal_valid, gt_valid], dim=1)  # (B, A)
        matched_gt, match_label = self.matcher(pairwise_iou(gt_boxes, candidates), gt_valid)  # (B, A) each
        match_label = torch.where(candidate_valid, match_label, torch.full_like(match_label, IGNORED))
        positive, negative = self.sampler(match_label)  # (B, A) each
        pos_image, pos_index = positive.nonzero(as_tuple=True)  # (Rp,), (Rp,)
        neg_image, neg_index = negative.nonzero(as_tuple=True)  # (Rn,), (Rn,)
        pos_gt = matched_gt[pos_image, pos_index]  # (Rp,)
        pos_boxes = candidates[pos_image, pos_index]  # (Rp, 4)
        image = torch.cat([pos_image, neg_image])  # (R,)
        boxes = torch.cat([pos_boxes, candidates[neg_image, neg_index]])  # (R, 4)
        labels = torch.cat([gt_labels[pos_image, pos_gt], torch.zeros_like(neg_image)])  # (R,)
        matched = torch.cat([pos_gt, torch.zeros_like(neg_image)])  # (R,)
        targets = self.box_coder.encode(gt_boxes[pos_image, pos_gt], pos_boxes)  # (Rp, 4)
        return RoISample(rois=image_index_rois(image, boxes), labels=labels, matched_gt=matched,
                         regression_targets=targets, num_positive=int(pos_image.shape[0]))

    def loss(self, class_logits: Tensor, box_deltas: Tensor, sample: RoISample) -> dict[str, Tensor]:
        """Cross-entropy on the logits and smooth L1 on the GT class's deltas of the positives.

        Args:
            class_logits: f32[R, K+1] raw logits (no softmax: cross_entropy applies log-softmax itself; the
                original project's softmax before it was a double softmax).
            box_deltas: f32[R, (K+1)*4].
            sample: the RoISample the predictions were made on.
        Returns:
            {"loss_box_cls", "loss_box_reg"}: scalars, finite and connected to the graph even when R = 0.
        """
        num_rois = class_logits.shape[0]
        if num_rois == 0:
            zero = class_logits.sum() * 0.0 + box_deltas.sum() * 0.0
            return {"loss_box_cls": zero, "loss_box_reg": zero.clone()}
        loss_cls = F.cross_entropy(class_logits, sample.labels)
        num_pos = sample.num_positive
        deltas = box_deltas[:num_pos].reshape(num_pos, self.num_classes + 1, 4)  # (Rp, (K+1)*4) -> (Rp, K+1, 4)
        deltas = deltas[torch.arange(num_pos, device=deltas.device), sample.labels[:num_pos]]  # (Rp, 4)
        # beta 1/9 and the sum over positives divided by all sampled RoIs, as torchvision's fastrcnn_loss
        loss_reg = F.smooth_l1_loss(deltas, sample.regression_targets, beta=1.0 / 9, reduction="sum") / num_rois
        return {"loss_box_cls": loss_cls, "loss_box_reg": loss_reg}

    @torch.no_grad()
    def predict(self, class_logits: Tensor, box_deltas: Tensor, proposals: Tensor, proposal_valid: Tensor,
                image_sizes: Tensor) -> Detections:
        """Detections of all images at once, with fixed shapes.

        Softmax, decode every class, clip to the image, drop background, score >= score_thresh, drop boxes
        smaller than min_box_size, per-class NMS (group image * (K+1) + class), keep the top D per image.

        Args:
            class_logits: f32[B*P, K+1]; box_deltas: f32[B*P, (K+1)*4], predicted on every proposal slot.
            proposals: f32[B, P, 4] they were predicted on; proposal_valid: bool[B, P] (padding slots are never
                detections).
            image_sizes: f32[B, 2] (h, w) of every resized image (the clip bounds).
        Returns:
            Detections padded to D = detections_per_img.
        """
        B, P = proposal_valid.shape
        C = class_logits.shape[1]  # K + 1
        probs = F.softmax(class_logits, dim=-1)[:, 1:].reshape(B, -1)  # (B*P, K) -> (B, N): N = P*K, no background
        # (B*P, C*4) -> (B*P, C, 4), decoded against each proposal, background dropped -> (B, N, 4)
        boxes = self.box_coder.decode(box_deltas.reshape(B * P, C, 4), proposals.reshape(B * P, 1, 4))
        boxes = clip_boxes(boxes[:, 1:].reshape(B, -1, 4), image_sizes[:, None, :])
        labels = torch.arange(1, C, device=probs.device).repeat(P)[None].expand(B, -1)  # (B, N): each RoI's classes
        wh = boxes[..., 2:] - boxes[..., :2]
        selectable = ((probs >= self.score_thresh) & (wh >= self.min_box_size).all(dim=2)
                      & proposal_valid.repeat_interleave(C - 1, dim=1))  # (B, N)
        groups = torch.arange(B, device=probs.device)[:, None] * C + labels  # (B, N): image * (K+1) + class
        keep = nms_mask(boxes, probs, groups, selectable, self.nms_thresh)  # (B, N)
        valid, out_boxes, out_scores, out_labels = top_per_image(boxes, probs, keep, self.detections_per_img,
                                                                 values=(labels,))
        return Detections(boxes=out_boxes, scores=out_scores, labels=out_labels, valid=valid)


def proposal_rois(proposals: Tensor) -> Tensor:
    """Every proposal slot of a batch as a RoI: f32[B, P, 4] -> f32[B*P, 5], image by image."""
    B, P = proposals.shape[:2]
    image = torch.arange(B, device=proposals.device)[:, None].expand(-1, P)  # (B, P)
    return image_index_rois(image.reshape(-1), proposals.reshape(-1, 4))  # (B*P,), (B*P, 4) -> (B*P, 5)
