"""The exportable inference graph of a `MaskRCNN`: one batched tensor in, fixed-shape padded tensors out.

`ExportGraph` runs the model's own submodules (backbone + FPN, RPN head, anchor generator, box coders, box head
and mask head layers) on a batch of images of one size, and replaces the three parts of eager inference whose
shapes depend on the data by fixed-shape equivalents:

- the NMS inputs are the candidates that pass the thresholds (one `nonzero`: the only data-dependent size of
  the graph, an unbacked size for torch.export, a NonZero for ONNX); after `nms` a scatter turns the kept
  indices back into a mask over the fixed candidate grid, and one `topk` per image picks the first P proposals
  (D detections) by score, which is what eager's "NMS, stable sort by image, first P" selects;
- `batched_nms` becomes one `nms` over boxes shifted apart per group (torchvision's own tracing path): its
  per-group loop and its `numel()` branch are guards on a data-dependent size;
- RoIAlign over the FPN levels pools every level's RoIs found by `nonzero` and scatters them back
  (`ExportRoIAlign`), instead of the eager pooler's host-side counts (`.tolist()` and `split`).

The RoI heads then run on the fixed [B * P] proposals and [B * D] detections, padding rows included; padding
rows are masked out of the selection and zeroed in the outputs, so an image without detections yields zeros.

Shape letters: B images, H/W input size, Hr/Wr resized, Hp/Wp padded canvas, A anchors of one image over all
levels, K candidates per image after the per-level top-k, P proposals per image, C classes with background
(K_fg + 1), N detection candidates per image (P * K_fg), D detections per image, M mask size.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms, roi_align

from maskrcnn.model.box_head import Detections
from maskrcnn.model.box_ops import clip_boxes
from maskrcnn.model.maskrcnn import MaskRCNN
from maskrcnn.model.poolers import LevelRoIAlign, image_index_rois
from maskrcnn.model.rpn import _flatten

OUTPUT_NAMES = ("boxes", "scores", "labels", "masks", "num_detections")

# score of a candidate that is not selectable (scores are probabilities >= 0)
_NOT_SELECTABLE = -1.0


class ExportRoIAlign(LevelRoIAlign):
    """`LevelRoIAlign` with the same level rule and `roi_align` settings, each level's RoIs found by `nonzero`
    and pooled outputs scattered back to the RoIs' rows: no host-side counts, so the graph has no guard on them.
    Single-threaded roi_align (the eager pooler's thread split is a CPU speed layer, not part of the graph)."""

    @classmethod
    def of(cls, pooler: LevelRoIAlign) -> ExportRoIAlign:
        """An ExportRoIAlign with `pooler`'s levels, output size, sampling ratio and alignment."""
        return cls(featmap_names=pooler.featmap_names, output_size=pooler.output_size,
                   sampling_ratio=pooler.sampling_ratio, aligned=pooler.aligned)

    def forward(self, features: dict[str, Tensor], rois: Tensor) -> Tensor:
        """f32[R, 5] RoIs (image index, xyxy in canvas pixels) -> f32[R, C, S, S] pooled from their levels."""
        maps = [features[name] for name in self.featmap_names]
        level = self.assign_levels(rois[:, 1:])  # (R,)
        pooled = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], self.output_size, self.output_size))
        for index, (feature, k) in enumerate(zip(maps, self.levels)):
            rows = torch.nonzero(level == index).squeeze(1)  # (R_k,)
            pooled_k = roi_align(feature, rois[rows], self.output_size, spatial_scale=2.0 ** -k,
                                 sampling_ratio=self.sampling_ratio, aligned=self.aligned)
            pooled = pooled.index_put((rows,), pooled_k)
        return pooled


def _nms_mask(boxes: Tensor, scores: Tensor, groups: Tensor, selectable: Tensor, iou_threshold: float) -> Tensor:
    """Per-group NMS over a fixed candidate grid.

    Args:
        boxes: f32[B, N, 4]; scores: f32[B, N]; groups: i64[B, N] group id (distinct across images);
        selectable: bool[B, N], candidates that enter the NMS.
    Returns:
        bool[B, N]: selectable candidates that the NMS kept.
    """
    rows = torch.nonzero(selectable.flatten()).squeeze(1)  # (B*N,) -> (S,): the data-dependent size
    flat_boxes = boxes.flatten(0, 1)[rows]  # (B, N, 4) -> (S, 4)
    # groups apart by more than the largest coordinate: one nms is then a per-group nms (torchvision's
    # _batched_nms_coordinate_trick). The maximum over all candidates, not the selected ones: defined when S = 0
    offsets = groups.flatten()[rows].to(boxes.dtype) * (boxes.max() + 1)  # (S,)
    kept = nms(flat_boxes + offsets[:, None], scores.flatten()[rows], iou_threshold)  # (S',) indices into rows
    mask = torch.zeros_like(selectable.flatten())
    return mask.index_put((rows[kept],), torch.ones_like(kept, dtype=torch.bool)).view_as(selectable)


def _top_per_image(scores: Tensor, keep: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Indices of the `count` best kept candidates of every image, by decreasing score.

    Args:
        scores: f32[B, N] (>= 0); keep: bool[B, N]; count: rows per image in the result, static.
    Returns:
        index: i64[B, count] into N (0 in padding rows); valid: bool[B, count], a prefix of every row.
    """
    masked = torch.where(keep, scores, _NOT_SELECTABLE)
    # `count` unselectable columns make N >= count whatever the image size: topk's k stays static
    masked = torch.cat([masked, masked.new_full((masked.shape[0], count), _NOT_SELECTABLE)], dim=1)
    top_scores, index = masked.topk(count, dim=1)  # (B, count), sorted
    valid = top_scores > _NOT_SELECTABLE
    return torch.where(valid, index, 0), valid


class ExportGraph(nn.Module):
    """Inference of a `MaskRCNN` as one graph with the export contract.

    Args:
        model: the model to export; a frozen copy in eval mode is taken, so later changes to `model` do not reach
            the graph. With the CPU speed layer (`cpu_speedups.optimize_for_cpu`) the graph holds the BatchNorm
            folding as arithmetic on the weights (which ONNX Runtime folds into constants when it loads the
            file); its threaded RoIAlign is replaced (`ExportRoIAlign`) and its training paths are not traced.

    forward(images f32[B, 3, H, W] RGB in 0..1) returns, D = detections_per_img, M = mask size:
        boxes f32[B, D, 4] xyxy in input pixels, scores f32[B, D], labels i64[B, D] (1..K),
        masks f32[B, D, M, M] box-relative mask probabilities of the detected class, num_detections i64[B];
        rows past num_detections are zero.
    """

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).cpu()
        for head in (self.model.box_head, self.model.mask_head):
            head.pooler = ExportRoIAlign.of(head.pooler)
        self.requires_grad_(False).eval()

    def _resized_size(self, height, width):
        """(Hr, Wr) of an input of size (height, width), as `ImageTransform.scale_factor` and interpolate's
        floor(size * scale); symbolic sizes stay symbolic (sym_min / sym_max instead of min / max)."""
        t = self.model.transform
        if t.min_size is None and t.max_size is None:
            return height, width
        if t.min_size is None:
            scale = torch.sym_min(1.0, t.max_size / torch.sym_max(height, width))
        else:
            scale = t.min_size / torch.sym_min(height, width)
            if t.max_size is not None:
                scale = torch.sym_min(scale, t.max_size / torch.sym_max(height, width))
        # trunc is floor for these positive sizes; math.floor of a symbolic size cannot be saved in a .pt2
        return math.trunc(height * scale), math.trunc(width * scale)

    def _prepare(self, images: Tensor):
        """Normalise, resize, pad: f32[B, 3, H, W] -> (f32[B, 3, Hp, Wp], Hr, Wr)."""
        t = self.model.transform
        x = (images - t.image_mean) / t.image_std  # normalised before resizing, as the eager transform
        height, width = self._resized_size(images.shape[2], images.shape[3])
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        if t.fixed_canvas is not None:
            canvas = t.fixed_canvas
        else:
            d = t.size_divisible
            canvas = ((height + d - 1) // d * d, (width + d - 1) // d * d)
        return F.pad(x, (0, canvas[1] - width, 0, canvas[0] - height)), height, width

    def _proposals(self, x: Tensor, features: dict[str, Tensor], size_hw: Tensor) -> tuple[Tensor, Tensor]:
        """RPN proposals: (f32[B, P, 4] resized-image pixels, bool[B, P]), P = post_nms_top_n_test."""
        rpn = self.model.rpn
        feature_list = list(features.values())
        B = x.shape[0]
        logits_per_level, deltas_per_level = rpn.head(feature_list)
        top_idx_per_level, level_per_level, start = [], [], 0
        anchors_per_level = []
        for level, (logits, feature) in enumerate(zip(logits_per_level, feature_list)):
            size = tuple(feature.shape[-2:])
            cell = rpn.anchor_generator.cell_anchors[level]
            anchors_per_level.append(rpn.anchor_generator._grid_anchors(tuple(x.shape[-2:]), size, cell))
            count = anchors_per_level[-1].shape[0]
            k = torch.sym_min(rpn.pre_nms_top_n_test, count)
            top_idx_per_level.append(_flatten(logits, B, 1).squeeze(-1).topk(k, dim=1).indices + start)  # (B, k)
            level_per_level.append(torch.full((k,), level, dtype=torch.int64))
            start = start + count
        top_idx = torch.cat(top_idx_per_level, dim=1)  # (B, K)
        levels = torch.cat(level_per_level)  # (K,)
        logits = torch.cat([_flatten(v, B, 1) for v in logits_per_level], dim=1).squeeze(-1)  # (B, A)
        deltas = torch.cat([_flatten(v, B, 4) for v in deltas_per_level], dim=1)  # (B, A, 4)
        anchors = torch.cat(anchors_per_level)  # (A, 4)

        scores = torch.sigmoid(torch.gather(logits, 1, top_idx))  # (B, K)
        top_deltas = torch.gather(deltas, 1, top_idx[:, :, None].expand(-1, -1, 4))  # (B, K, 4)
        boxes = clip_boxes(rpn.box_coder.decode(top_deltas, anchors[top_idx]), size_hw)  # (B, K, 4)
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        selectable = (widths >= rpn.min_size) & (heights >= rpn.min_size) & (scores >= rpn.score_thresh)
        groups = torch.arange(B)[:, None] * len(feature_list) + levels  # (B, K): image * L + level
        keep = _nms_mask(boxes, scores, groups, selectable, rpn.nms_thresh)
        index, valid = _top_per_image(scores, keep, rpn.post_nms_top_n_test)  # (B, P)
        proposals = torch.gather(boxes, 1, index[:, :, None].expand(-1, -1, 4))  # (B, P, 4)
        return proposals, valid

    def _detections(self, features: dict[str, Tensor], proposals: Tensor, proposal_valid: Tensor,
                    size_hw: Tensor) -> Detections:
        """Box head inference as `BoxHead.predict`, boxes in resized-image pixels."""
        head = self.model.box_head
        B, P = proposal_valid.shape
        image = torch.arange(B)[:, None].expand(-1, P).flatten()  # (B*P,)
        rois = image_index_rois(image, proposals.flatten(0, 1))  # (B, P, 4) -> (B*P, 5)
        class_logits, box_deltas = head(features, rois)  # (B*P, C), (B*P, C*4)
        C = class_logits.shape[1]
        probs = F.softmax(class_logits, dim=-1)[:, 1:].reshape(B, -1)  # (B*P, C-1) -> (B, N), no background
        # (B*P, C*4) -> (B*P, C, 4), decoded against each RoI, background dropped -> (B, N, 4)
        boxes = head.box_coder.decode(box_deltas.reshape(-1, C, 4), rois[:, None, 1:])[:, 1:].reshape(B, -1, 4)
        boxes = clip_boxes(boxes, size_hw)
        labels = torch.arange(1, C).repeat(P)[None].expand(B, -1)  # (N,) -> (B, N), classes of each RoI in turn
        wh = boxes[..., 2:] - boxes[..., :2]
        selectable = ((probs >= head.score_thresh) & (wh >= head.min_box_size).all(dim=2)
                      & proposal_valid.repeat_interleave(C - 1, dim=1))  # (B, N)
        groups = torch.arange(B)[:, None] * C + labels  # (B, N): image * C + class
        keep = _nms_mask(boxes, probs, groups, selectable, head.nms_thresh)
        index, valid = _top_per_image(probs, keep, head.detections_per_img)  # (B, D)
        return Detections(boxes=torch.gather(boxes, 1, index[:, :, None].expand(-1, -1, 4)) * valid[:, :, None],
                          scores=torch.gather(probs, 1, index) * valid,
                          labels=torch.gather(labels, 1, index) * valid, valid=valid)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """f32[B, 3, H, W] in 0..1 -> (boxes, scores, labels, masks, num_detections), see the class docstring."""
        _, _, H, W = images.shape
        x, height, width = self._prepare(images)
        features = self.model.backbone(x)
        # (h, w) of the resized images: boxes are clipped to them, not to the padded canvas
        size_hw = torch.stack([torch.scalar_tensor(s, dtype=torch.float32) for s in (height, width)])
        proposals, proposal_valid = self._proposals(x, features, size_hw)
        detections = self._detections(features, proposals, proposal_valid, size_hw)
        # fixed shapes: the mask head runs on every slot, empty ones included (zeroed below)
        masks = self.model._mask_probabilities(features, detections, every_slot=True)  # (B, D, M, M)
        valid = detections.valid
        # resized -> input pixels with the per-axis ratio input / resized in float32, as the eager transform
        size_in = torch.stack([torch.scalar_tensor(s, dtype=torch.float32) for s in (H, W)])
        ratio_xyxy = (size_in / size_hw)[[1, 0, 1, 0]]  # (2,) -> (4,) as (x, y, x, y)
        return (detections.boxes * ratio_xyxy, detections.scores, detections.labels,
                masks * valid[:, :, None, None], valid.sum(dim=1))
