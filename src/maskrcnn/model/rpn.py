"""Region proposal network (Faster R-CNN sec. 3.1, on FPN levels as in Lin et al. 2017 sec. 4.1), batched.

Matching, sampling, losses and proposal selection run on the whole batch at once: IoU as one [B, G, A] tensor
against anchors shared by the batch, one `topk` per level over [B, n_level], one NMS per level for all images
(group = image) and one `topk` per image into padded [B, P] outputs (`box_ops`). Proposals equal torchvision's
`RegionProposalNetwork` for the same weights (same boxes, same order up to score ties).

Shape letters: B images, L pyramid levels, A anchors over all levels of one image (shared by the batch),
A_l anchors of level l, Ak anchors per location, G ground-truth boxes per image (padded), K candidates per image
after the per-level top-k, P proposals per image (padded), C channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, box_iou

from maskrcnn.model.anchors import AnchorGenerator
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.box_ops import clip_boxes, nms_mask, top_per_image
from maskrcnn.model.matcher import BalancedSampler, Matcher, gather_matched
from maskrcnn.structures import ImageBatch


class RPNHead(nn.Module):
    """3x3 conv + ReLU layers shared by all levels, then 1x1 objectness logits and 1x1 box deltas.

    Parameter names are torchvision's (`conv.<i>.0.*`, `cls_logits.*`, `bbox_pred.*`), so its weights load as is.

    Args:
        in_channels: C, channels of every pyramid level.
        num_anchors: Ak, anchors per location.
        num_convs: 3x3 conv + ReLU layers (torchvision v1: 1, v2: 2).
    """

    def __init__(self, *, in_channels: int, num_anchors: int, num_convs: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(*[Conv2dNormActivation(in_channels, in_channels, kernel_size=3, norm_layer=None)
                                    for _ in range(num_convs)])
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """L tensors f32[B, C, Hi, Wi] -> (L logits f32[B, Ak, Hi, Wi], L deltas f32[B, Ak*4, Hi, Wi])."""
        logits, deltas = [], []
        for feature in features:
            hidden = self.conv(feature)
            logits.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return logits, deltas


class RPN(nn.Module):
    """Anchors, objectness and box losses, and proposals for a batch.

    Args:
        head: an `RPNHead`.
        anchor_generator: an `AnchorGenerator` with one size per level.
        box_coder: deltas <-> boxes; weights (1, 1, 1, 1) as in the paper.
        matcher: anchor-to-GT matcher (0.7 / 0.3, low-quality matches allowed).
        sampler: anchors per image for the loss (256, half positive at most).
        pre_nms_top_n_train, pre_nms_top_n_test: top-scoring anchors kept per level and image before NMS.
        post_nms_top_n_train, post_nms_top_n_test: proposals kept per image after NMS.
        nms_thresh: IoU threshold of the NMS (per image and level, as torchvision).
        min_size: proposals with a side shorter than this (pixels, after clipping) are removed.
        score_thresh: proposals of objectness probability below this are removed.
    """

    def __init__(self, *, head: RPNHead, anchor_generator: AnchorGenerator, box_coder: BoxCoder, matcher: Matcher,
                 sampler: BalancedSampler, pre_nms_top_n_train: int, pre_nms_top_n_test: int,
                 post_nms_top_n_train: int, post_nms_top_n_test: int, nms_thresh: float, min_size: float,
                 score_thresh: float) -> None:
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder
        self.matcher = matcher
        self.sampler = sampler
        self.pre_nms_top_n_train, self.pre_nms_top_n_test = pre_nms_top_n_train, pre_nms_top_n_test
        self.post_nms_top_n_train, self.post_nms_top_n_test = post_nms_top_n_train, post_nms_top_n_test
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.score_thresh = score_thresh

    def forward(self, batch: ImageBatch, features: dict[str, Tensor], gt_boxes: Tensor | None = None,
                gt_valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Proposals (and losses in training) for a batch.

        Args:
            batch: the ImageBatch the features were computed on (canvas and per-image sizes).
            features: {"p2".."p6": f32[B, C, Hi, Wi]}, used in order, finest first.
            gt_boxes: f32[B, G, 4] in resized-image pixels, padded; required in training.
            gt_valid: bool[B, G], False for padding rows; required in training.
        Returns:
            proposals: f32[B, P, 4] xyxy in resized-image pixels, detached, sorted by score per image.
            proposal_scores: f32[B, P] objectness probabilities (0 in padding rows).
            proposal_valid: bool[B, P], False for padding rows (an image may have fewer than P proposals).
                P = post_nms_top_n is fixed, so no host sync is spent on it and the graph's shapes are static.
            losses: {"loss_rpn_cls", "loss_rpn_box"} in training, {} in eval.
        """
        if self.training and (gt_boxes is None or gt_valid is None):
            raise ValueError("RPN: gt_boxes and gt_valid are required in training mode")
        feature_list = list(features.values())
        logits_per_level, deltas_per_level = self.head(feature_list)
        anchors_per_level = self.anchor_generator(
            tuple(batch.tensor.shape[-2:]), [tuple(f.shape[-2:]) for f in feature_list], batch.tensor.device)
        B = batch.tensor.shape[0]
        # float32 for box arithmetic and losses also when the head ran under bf16 autocast
        logits_per_level = [_flatten(x, B, 1).squeeze(-1).float() for x in logits_per_level]  # L x (B, A_l)
        deltas_per_level = [_flatten(x, B, 4).float() for x in deltas_per_level]  # L x (B, A_l, 4)

        proposals, scores, valid = self._select_proposals(
            [x.detach() for x in logits_per_level], [x.detach() for x in deltas_per_level], anchors_per_level, batch)

        losses: dict[str, Tensor] = {}
        if self.training:
            anchors = torch.cat(anchors_per_level)  # (A, 4)
            positive, negative, box_targets = self._assign_targets(anchors, gt_boxes, gt_valid)
            losses = self._losses(torch.cat(logits_per_level, dim=1), torch.cat(deltas_per_level, dim=1),
                                  positive, negative, box_targets)
        return proposals, scores, valid, losses

    @torch.no_grad()
    def _assign_targets(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Matches anchors to GT and samples the loss anchors.

        Args:
            anchors: f32[A, 4]; gt_boxes: f32[B, G, 4]; gt_valid: bool[B, G].
        Returns:
            positive, negative: bool[B, A] sampled anchors.
            box_targets: f32[B, A, 4] encoded deltas to the matched GT box, 0 where not positive.
        """
        B, G = gt_valid.shape
        iou = box_iou(gt_boxes.reshape(B * G, 4), anchors).view(B, G, anchors.shape[0])  # (B*G, A) -> (B, G, A)
        matched_idx, match_label = self.matcher(iou, gt_valid)
        positive, negative = self.sampler(match_label)
        matched_boxes = gather_matched(gt_boxes, matched_idx)  # (B, A, 4)
        box_targets = self.box_coder.encode(matched_boxes, anchors[None])  # (B, A, 4)
        # non-positive anchors may match padding (zero boxes, log 0): zero them so no inf/nan reaches the loss
        box_targets = torch.where(positive[:, :, None], box_targets, 0.0)
        return positive, negative, box_targets

    def _losses(self, logits: Tensor, deltas: Tensor, positive: Tensor, negative: Tensor,
                box_targets: Tensor) -> dict[str, Tensor]:
        """Objectness BCE over the sampled anchors and smooth L1 (beta 1/9) over the positive ones, both divided by
        the number of sampled anchors of the batch (torchvision's normalisation), over all levels.

        Masked sums instead of indexing keep the shapes static (no nonzero, no host sync), and an image without
        GT still yields losses connected to the graph (box loss 0 * deltas).
        """
        sampled = positive | negative  # (B, A)
        num_sampled = sampled.sum().clamp(min=1)
        cls_loss = F.binary_cross_entropy_with_logits(logits, positive.to(logits.dtype), reduction="none")
        loss_cls = torch.where(sampled, cls_loss, 0.0).sum() / num_sampled
        box_loss = F.smooth_l1_loss(deltas, box_targets, beta=1 / 9, reduction="none").sum(dim=2)  # (B, A, 4) -> (B, A)
        loss_box = torch.where(positive, box_loss, 0.0).sum() / num_sampled
        return {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}

    def _select_proposals(self, logits_per_level: list[Tensor], deltas_per_level: list[Tensor],
                          anchors_per_level: list[Tensor], batch: ImageBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k per level, decode, clip, filter, NMS per image and level, top P per image.

        Levels stay separate tensors rather than slices of one: slicing at symbolic offsets costs torch.export
        seconds of symbolic simplification per level.

        Args:
            logits_per_level: L x f32[B, A_l]; deltas_per_level: L x f32[B, A_l, 4]; anchors_per_level: L x f32[A_l, 4].
        Returns:
            proposals f32[B, P, 4], scores f32[B, P], valid bool[B, P].
        """
        pre_nms_top_n = self.pre_nms_top_n_train if self.training else self.pre_nms_top_n_test
        post_nms_top_n = self.post_nms_top_n_train if self.training else self.post_nms_top_n_test
        B, device = logits_per_level[0].shape[0], logits_per_level[0].device

        image = torch.arange(B, device=device)[:, None]  # (B, 1)
        # k = pre_nms_top_n columns of -inf after every level's logits: topk's k is then static whatever A_l is
        # (a level with fewer anchors keeps its padding columns, marked not selectable), so every shape after it is
        # static; min(k, A_l) would carry a symbolic Min through the rest of the exported graph, which costs
        # torch.export, its ONNX translation and loading a .pt2 a minute each of symbolic simplification
        k = pre_nms_top_n
        padding = logits_per_level[0].new_full((B, k), float("-inf"))  # (B, k)
        boxes_per_level, scores_per_level, keep_per_level = [], [], []
        for logits, deltas, anchors in zip(logits_per_level, deltas_per_level, anchors_per_level):
            top_logits, top_idx = torch.cat([logits, padding], dim=1).topk(k, dim=1)  # (B, A_l + k) -> (B, k)
            is_anchor = top_idx < anchors.shape[0]  # (B, k), False for padding columns
            top_idx = torch.where(is_anchor, top_idx, 0)
            scores = torch.sigmoid(top_logits)  # (B, k)
            top_deltas = torch.gather(deltas, 1, top_idx[:, :, None].expand(-1, -1, 4))  # (B, k, 4)
            boxes = self.box_coder.decode(top_deltas, anchors[top_idx])  # (B, k, 4)
            boxes = clip_boxes(boxes, batch.image_sizes[:, None, :])  # to each image, not the canvas
            widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
            selectable = is_anchor & (widths >= self.min_size) & (heights >= self.min_size) & (
                scores >= self.score_thresh)
            # NMS per image and level: one call per level with the images as groups (one call for all B * L
            # groups would compare every candidate with the K of its image: about L times the work)
            keep_per_level.append(nms_mask(boxes, scores, image + torch.zeros_like(top_idx), selectable,
                                           self.nms_thresh))  # (B, k)
            boxes_per_level.append(boxes)
            scores_per_level.append(scores)
        # (B, K) candidates of all levels -> the best P survivors of every image
        valid, proposals, proposal_scores = top_per_image(
            torch.cat(boxes_per_level, dim=1), torch.cat(scores_per_level, dim=1), torch.cat(keep_per_level, dim=1),
            post_nms_top_n)  # (B, P)
        return proposals, proposal_scores, valid


def _flatten(x: Tensor, B: int, values: int) -> Tensor:
    """Head output f32[B, Ak*values, Hi, Wi] -> f32[B, Hi*Wi*Ak, values], the anchors' location-major order."""
    _, channels, height, width = x.shape
    x = x.view(B, channels // values, values, height, width)  # (B, Ak, values, Hi, Wi)
    # flatten, not reshape(B, -1, values): inferring -1 divides symbolic sizes, which costs torch.export a minute
    return x.permute(0, 3, 4, 1, 2).flatten(1, 3)  # (B, Hi, Wi, Ak, values) -> (B, Hi*Wi*Ak, values)
