"""Box head of Faster R-CNN with FPN: RoI sampling, multi-level RoIAlign, 2 FC layers, class scores and
class-specific box deltas, losses and batched inference.

Shape letters: B images, G GT boxes per image (padded), P proposals per image (padded), A = P + G candidate
RoIs per image in training, R RoIs of the whole batch (flattened), K foreground classes (K + 1 with background),
C feature channels, S pooled size, D detections per image (padded).

Every step runs on the whole batch at once: one [B, G, A] IoU, one sampling call, one RoIAlign per FPN level
over the RoIs of all images (boxes as [R, 5] with the image index), one `batched_nms` with group id
image_index * (K + 1) + class.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, roi_align

from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.matcher import IGNORED, BalancedSampler, Matcher, pairwise_iou
from maskrcnn.structures import pack_per_image


def _executor(workers: int) -> ThreadPoolExecutor:
    """A thread pool of `workers` threads for this process."""
    # keyed by process id too: a forked child inherits the pool object but not its threads, and would wait forever
    return _process_executor(workers, os.getpid())


@functools.cache
def _process_executor(workers: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roi_align")


class ThreadedRoIAlign(torch.autograd.Function):
    """torchvision's roi_align on CPU split across threads: the RoIs in the forward, the channels in the backward.

    Its CPU kernels loop over the RoIs on one thread whatever torch's thread count. Measured on 2 cores, 1024 RoIs
    on a 2 x 256 x 200 x 272 map: forward 364 -> 206 ms, forward + backward 1170 -> 694 ms. Each thread's
    backward writes the gradient of its own channels, so none is summed and forward and gradient equal one
    roi_align call exactly (700 RoIs on that map, backward alone: 448 ms in one call, 295 ms split by RoIs with a
    summed gradient, 216 ms split by channels; in a whole training step the last two are within the noise).
    """

    @staticmethod
    def forward(ctx, feature: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int,
                aligned: bool, workers: int) -> Tensor:
        """f32[B, C, H, W] map, f32[R, 5] RoIs -> f32[R, C, S, S], in `workers` threads."""
        ctx.save_for_backward(rois)
        ctx.settings = (output_size, spatial_scale, sampling_ratio, aligned, workers, tuple(feature.shape))

        def pool(chunk: Tensor) -> Tensor:
            with torch.no_grad():  # grad mode is per thread: the workers must not record a graph of their own
                return torch.ops.torchvision.roi_align(feature, chunk, spatial_scale, output_size, output_size,
                                                       sampling_ratio, aligned)

        return torch.cat(list(_executor(workers).map(pool, rois.tensor_split(workers))))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        output_size, spatial_scale, sampling_ratio, aligned, workers, (B, C, H, W) = ctx.settings

        def scatter(grad_channels: Tensor) -> Tensor:
            """f32[R, Cw, S, S] gradient of some channels -> f32[B, Cw, H, W]."""
            return torch.ops.torchvision._roi_align_backward(grad_channels.contiguous(), rois, spatial_scale,
                                                             output_size, output_size, B, grad_channels.shape[1],
                                                             H, W, sampling_ratio, aligned)

        grads = list(_executor(workers).map(scatter, grad.tensor_split(workers, dim=1)))
        return torch.cat(grads, dim=1), None, None, None, None, None, None


class LevelRoIAlign(nn.Module):
    """RoIAlign over FPN levels, each RoI pooled from the level that matches its size (FPN paper, eq. 1):
    k = floor(k0 + log2(sqrt(w * h) / 224)), clamped to the available levels, with k0 = 4.

    Same level rule and epsilon as torchvision's `MultiScaleRoIAlign`, but with a configurable `aligned`
    (half-pixel-correct sampling, Detectron2) and one host sync for all levels (the level counts).

    Args:
        featmap_names: feature keys "p<k>", finest first; level k is pooled with spatial scale 2**-k.
        output_size: S, pooled height and width.
        sampling_ratio: sampling points per bin side (<= 0: adaptive, as roi_align).
        aligned: shift box coordinates by -0.5 px (True) or not (False, torchvision v1).
    """

    def __init__(self, *, featmap_names: Sequence[str] = ("p2", "p3", "p4", "p5"), output_size: int,
                 sampling_ratio: int, aligned: bool) -> None:
        super().__init__()
        self.featmap_names = tuple(featmap_names)
        self.levels = [int(name.lstrip("p")) for name in self.featmap_names]
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def assign_levels(self, boxes: Tensor) -> Tensor:
        """i64[R]: index into `featmap_names` of the level of every box f32[R, 4] (canonical 224 px at level 4)."""
        sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        # the 1e-6 keeps boxes of exactly 224 * 2**n on the upper level, as torchvision's LevelMapper
        level = torch.floor(4 + torch.log2(sizes / 224) + torch.tensor(1e-6, dtype=sizes.dtype))
        level = level.clamp(min=self.levels[0], max=self.levels[-1])
        return level.to(torch.int64) - self.levels[0]

    def forward(self, features: dict[str, Tensor], rois: Tensor) -> Tensor:
        """Pools every RoI.

        Args:
            features: {"p2": f32[B, C, H2, W2], ...} at strides 2**k of the padded canvas.
            rois: f32[R, 5] (image index, x1, y1, x2, y2) in canvas pixels.
        Returns:
            f32[R, C, S, S], in the order of `rois`.
        """
        maps = [features[name] for name in self.featmap_names]
        level = self.assign_levels(rois[:, 1:])
        order = torch.argsort(level, stable=True)  # RoIs grouped by level
        # the one host sync of the pooler; a comparison, not bincount, whose CUDA kernel reads the maximum first
        counts = (level[:, None] == torch.arange(len(maps), device=level.device)).sum(dim=0).tolist()
        pooled_per_level = []
        for feature, k, rois_k in zip(maps, self.levels, rois[order].split(counts)):
            if rois_k.shape[0]:
                pooled_per_level.append(self._roi_align(feature, rois_k, 2.0 ** -k))
        channels = maps[0].shape[1]
        if not pooled_per_level:
            return maps[0].new_zeros((0, channels, self.output_size, self.output_size))
        pooled_sorted = torch.cat(pooled_per_level)  # (R, C, S, S) in level order
        # back to the order of `rois`: row i of pooled_sorted is RoI order[i]. A copy to those rows rather than a
        # gather by the inverse permutation, whose backward is an accumulating scatter; the copy's backward is a
        # gather (CPU, 1024 x 256 x 7 x 7, forward + backward: 48 -> 17 ms)
        return torch.index_copy(torch.empty_like(pooled_sorted), 0, order, pooled_sorted)

    def _roi_align(self, feature: Tensor, rois: Tensor, spatial_scale: float) -> Tensor:
        """One level: f32[B, C, H, W], f32[R, 5] -> f32[R, C, S, S]; on CPU split across torch's threads."""
        workers = torch.get_num_threads() if feature.device.type == "cpu" else 1
        # ThreadedRoIAlign calls the kernels directly, so it takes float32 maps only (autocast falls back here)
        splittable = min(rois.shape[0], feature.shape[1]) >= workers  # RoIs in the forward, channels backward
        if workers > 1 and splittable and feature.dtype == rois.dtype == torch.float32:
            return ThreadedRoIAlign.apply(feature, rois, self.output_size, spatial_scale, self.sampling_ratio,
                                          self.aligned, workers)
        return roi_align(feature, rois, self.output_size, spatial_scale=spatial_scale,
                         sampling_ratio=self.sampling_ratio, aligned=self.aligned)


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
    """Box-head detections of a batch, padded to D per image, sorted by score within each image.

    Attributes:
        boxes: f32[B, D, 4] xyxy in resized-image pixels (zeros where not valid).
        scores: f32[B, D] class probabilities.
        labels: i64[B, D] classes 1..K (0 where not valid).
        valid: bool[B, D], a prefix of every row.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    valid: Tensor


def image_index_rois(image_index: Tensor, boxes: Tensor) -> Tensor:
    """(i64[R], f32[R, 4]) -> f32[R, 5] RoIs with the image index first, as `roi_align` takes them."""
    return torch.cat([image_index.to(boxes.dtype)[:, None], boxes], dim=1)


class BoxHead(nn.Module):
    """Two-FC box head (FPN paper, sec. 4.2) with its predictor, losses and inference.

    Layer names follow torchvision (`fc6`, `fc7`, `cls_score`, `bbox_pred`) so weights convert one to one.

    Args:
        pooler: RoIAlign over the FPN levels (7x7).
        in_channels: C, channels of the pooled features.
        representation_size: width of the two FC layers (1024).
        num_classes: K foreground classes; the predictor has K + 1 logits and (K + 1) * 4 deltas.
        matcher: proposal-to-GT matcher (IoU 0.5, no low-quality matches).
        sampler: RoI sampler (512 per image, 25 % foreground).
        box_coder: delta coder with weights (10, 10, 5, 5).
        score_thresh: detections with class probability below this are dropped.
        nms_thresh: IoU of the per-class NMS.
        detections_per_img: D, detections kept per image.
        min_box_size: detections narrower or shorter than this (pixels) are dropped.
    """

    def __init__(self, *, pooler: LevelRoIAlign, in_channels: int, representation_size: int, num_classes: int,
                 matcher: Matcher, sampler: BalancedSampler, box_coder: BoxCoder, score_thresh: float,
                 nms_thresh: float, detections_per_img: int, min_box_size: float = 1e-2) -> None:
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
        self.fc6 = nn.Linear(in_channels * pooler.output_size ** 2, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.cls_score = nn.Linear(representation_size, num_classes + 1)
        self.bbox_pred = nn.Linear(representation_size, (num_classes + 1) * 4)
        # small predictor init (Detectron2): uniform class probabilities and near-identity boxes at the start
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, features: dict[str, Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits and deltas of RoIs f32[R, 5] -> (f32[R, K+1], f32[R, (K+1)*4])."""
        x = self.pooler(features, rois).flatten(1)  # (R, C, S, S) -> (R, C*S*S)
        x = F.relu(self.fc6(x))
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
        B = proposals.shape[0]
        if gt_boxes.shape[1] == 0:  # no GT in the whole batch: one padding row keeps the gathers below valid
            gt_boxes = proposals.new_zeros((B, 1, 4))
            gt_labels = gt_labels.new_zeros((B, 1))
            gt_valid = gt_valid.new_zeros((B, 1))
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
    def predict(self, class_logits: Tensor, box_deltas: Tensor, rois: Tensor, image_sizes: Tensor,
                num_images: int) -> Detections:
        """Detections of all images at once.

        Softmax, decode every class, clip to the image, drop background, score >= score_thresh, drop boxes
        smaller than min_box_size, per-class NMS (one `batched_nms`, group image * (K+1) + class), keep the
        top D per image.

        Args:
            class_logits: f32[R, K+1]; box_deltas: f32[R, (K+1)*4]; rois: f32[R, 5] they were predicted on.
            image_sizes: f32[B, 2] (h, w) of every resized image (the clip bounds).
            num_images: B.
        Returns:
            Detections padded to D = detections_per_img.
        """
        num_rois, num_labels = class_logits.shape  # R, K + 1
        image = rois[:, 0].to(torch.int64)  # (R,)
        probs = F.softmax(class_logits, dim=-1)  # (R, K+1)
        boxes = self.box_coder.decode(box_deltas.reshape(num_rois, num_labels, 4), rois[:, None, 1:])  # (R, K+1, 4)
        hw = image_sizes[image]  # (R, 2)
        x = torch.minimum(boxes[..., 0::2].clamp(min=0), hw[:, None, 1:2])  # (R, K+1, 2)
        y = torch.minimum(boxes[..., 1::2].clamp(min=0), hw[:, None, 0:1])  # (R, K+1, 2)
        boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)[:, 1:]  # (R, K, 4) no background
        scores = probs[:, 1:]  # (R, K)
        labels = torch.arange(1, num_labels, device=rois.device).expand(num_rois, -1)  # (R, K)
        image = image[:, None].expand(-1, num_labels - 1)  # (R, K)
        boxes, scores, labels, image = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1), image.reshape(-1)
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = (scores >= self.score_thresh) & (wh >= self.min_box_size).all(dim=1)
        keep = keep.nonzero().squeeze(1)
        boxes, scores, labels, image = boxes[keep], scores[keep], labels[keep], image[keep]
        keep = batched_nms(boxes, scores, image * num_labels + labels, self.nms_thresh)  # sorted by score
        boxes, scores, labels, image = boxes[keep], scores[keep], labels[keep], image[keep]
        # the top D of every image: a stable sort by image keeps the score order inside it
        image, order = torch.sort(image, stable=True)
        valid, out_boxes, out_scores, out_labels = pack_per_image(
            image, num_images, self.detections_per_img, boxes[order], scores[order], labels[order])
        return Detections(boxes=out_boxes, scores=out_scores, labels=out_labels, valid=valid)


def proposal_rois(proposals: Tensor, proposal_valid: Tensor) -> Tensor:
    """Valid proposals of a batch as RoIs: (f32[B, P, 4], bool[B, P]) -> f32[R, 5], image by image."""
    image, index = proposal_valid.nonzero(as_tuple=True)
    return image_index_rois(image, proposals[image, index])

