"""Mask R-CNN (He et al. 2017) assembled from its parts, with torchvision's calling convention.

Shape letters: B images, G GT boxes per image (padded), P proposals per image, R RoIs of the batch,
D detections per image (padded), K foreground classes, M mask size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.model.box_head import BoxHead, Detections, proposal_rois
from maskrcnn.model.mask_head import MaskHead
from maskrcnn.model.mask_rle import MASK_FORMATS, detections_in_format
from maskrcnn.model.poolers import image_index_rois
from maskrcnn.model.postprocess import PASTE_MODES, unpad
from maskrcnn.model.precision import PrecisionChoice
from maskrcnn.model.rpn import RPN
from maskrcnn.model.transform import ImageTransform
from maskrcnn.structures import ImageBatch, check_targets, pad_per_image

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_box_cls", "loss_box_reg", "loss_mask")


class MaskRCNN(nn.Module):
    """Mask R-CNN: transform -> backbone + FPN -> RPN -> box head -> mask head -> mask paste.

    A drop-in replacement for torchvision's `maskrcnn_resnet50_fpn`: `model(images, targets)` returns the
    loss dict in train mode and one dict of detections per image in eval mode.

    Args:
        transform: normalise / resize / pad (`ImageTransform`).
        backbone: ResNet + FPN returning {"p2".."p6"}.
        rpn: region proposal network.
        box_head: `BoxHead`.
        mask_head: `MaskHead`.
        paste_mode: "exact" or "torchvision", see `postprocess.paste_masks`.
        precision: CPU inference in "fp32", "bf16" (backbone and heads under bf16 autocast) or "auto" (the
            faster, timed on the first calls), or a `PrecisionChoice`; see `precision.py`.
    """

    def __init__(self, *, transform: ImageTransform, backbone: nn.Module, rpn: RPN, box_head: BoxHead,
                 mask_head: MaskHead, paste_mode: str = "exact", precision: str | PrecisionChoice = "fp32") -> None:
        super().__init__()
        if paste_mode not in PASTE_MODES:
            raise ValueError(f"MaskRCNN: paste_mode must be one of {PASTE_MODES}, got {paste_mode!r}")
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.box_head = box_head
        self.mask_head = mask_head
        self.paste_mode = paste_mode
        self.precision = precision if isinstance(precision, PrecisionChoice) else PrecisionChoice(precision)

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict] | None = None):
        """Losses (train mode) or detections (eval mode).

        Args:
            images: B tensors f32[3, H, W] in 0..1, sizes may differ.
            targets: train mode only, B dicts {"boxes" f32[N, 4] xyxy px, "labels" i64[N] 1..K,
                "masks" u8[N, H, W]} at the original image sizes (N may be 0).
        Returns:
            train: {"loss_rpn_cls", "loss_rpn_box", "loss_box_cls", "loss_box_reg", "loss_mask"} scalars.
            eval: B dicts {"boxes" f32[D, 4], "labels" i64[D], "scores" f32[D], "masks" f32[D, 1, H, W]} in
                original image pixels, sorted by score.
        """
        if not self.training:
            return self.inference(images)
        if targets is None:
            raise ValueError("MaskRCNN: targets are required in train mode")
        if len(targets) != len(images):
            raise ValueError(f"MaskRCNN: {len(images)} images but {len(targets)} targets")
        check_targets(targets, [tuple(image.shape[-2:]) for image in images])
        for index, target in enumerate(targets):
            if "masks" not in target:
                raise ValueError(f"target {index}: 'masks' is required to train the mask head")
        return self._losses(images, targets)

    def _losses(self, images: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        batch, targets = self.transform(images, targets)
        device = batch.tensor.device
        gt_boxes, gt_valid = pad_per_image([t["boxes"].to(device) for t in targets])  # (B, G, 4), (B, G)
        gt_labels, _ = pad_per_image([t["labels"].to(device) for t in targets])  # (B, G)
        features = self.backbone(batch.tensor)
        proposals, _, proposal_valid, losses = self.rpn(batch, features, gt_boxes, gt_valid)

        sample = self.box_head.sample(proposals, proposal_valid, gt_boxes, gt_labels, gt_valid)
        class_logits, box_deltas = self.box_head(features, sample.rois)
        losses.update(self.box_head.loss(class_logits, box_deltas, sample))

        positive = slice(0, sample.num_positive)  # foreground RoIs come first
        mask_logits = self.mask_head(features, sample.rois[positive], sample.labels[positive])  # (Rp, M, M)
        mask_targets = self.mask_head.targets(sample.rois[positive], sample.matched_gt[positive], gt_valid,
                                              [t["masks"].to(device) for t in targets], batch.scales)
        losses["loss_mask"] = self.mask_head.loss(mask_logits, mask_targets)
        return {key: losses[key] for key in LOSS_KEYS}

    @torch.no_grad()
    def detect(self, images: Tensor | Sequence[Tensor]) -> Detections:
        """Padded detections of a batch with their box-relative masks: the model's output before the mask paste.

        The one inference path: `inference` (eval-mode `forward`) pastes its masks, and `maskrcnn.export` exports
        it as written (torch.export and ONNX, dynamic batch and image size). Every image has D =
        detections_per_img slots (`valid` marks the filled ones, a prefix), so the outputs have fixed shapes; the
        data-dependent sizes inside (the candidates entering each NMS, the RoIs of each pyramid level, the valid
        detections the mask head runs on) are single `nonzero` / count steps.

        Args:
            images: f32[B, 3, H, W] in 0..1, or B tensors f32[3, H, W] of any sizes; or the ImageBatch that
                `self.transform` made of them (the caller then need not hold the full-size float images while the
                model runs: 144 MB for a 4000 x 3000 photo).
        Returns:
            Detections: boxes f32[B, D, 4] in original-image pixels, scores f32[B, D], labels i64[B, D],
            valid bool[B, D], masks f32[B, D, M, M] probabilities inside each box; zeros where not valid.
        """
        return self._detect(self._eval_batch(images))[0]

    def _eval_batch(self, images: Tensor | Sequence[Tensor] | ImageBatch) -> ImageBatch:
        if self.training:
            raise RuntimeError("MaskRCNN: detection needs eval mode (the RPN, the transform and BatchNorm use their "
                               "test-time behaviour); call model.eval() first")
        return images if isinstance(images, ImageBatch) else self.transform(images)[0]

    def _detect(self, batch: ImageBatch) -> tuple[Detections, Tensor, Tensor, Tensor]:
        """`detect` of a prepared batch, plus the proposals (resized pixels, scores, valid) it came from."""
        with self.precision.autocast(batch.tensor):  # bf16 or fp32; the heads' outputs are cast to fp32
            features = self.backbone(batch.tensor)
            proposals, proposal_scores, proposal_valid, _ = self.rpn(batch, features)
            # every proposal slot, padding included: fixed shapes, and the RPN fills all P of a real photo anyway
            class_logits, box_deltas = self.box_head(features, proposal_rois(proposals))  # (B*P, K+1), (B*P, (K+1)*4)
            detections = self.box_head.predict(class_logits.float(), box_deltas.float(), proposals, proposal_valid,
                                               batch.image_sizes)
            masks = self._mask_probabilities(features, detections)
        detections = dataclasses.replace(detections, boxes=self.transform.boxes_to_original(detections.boxes, batch),
                                         masks=masks)
        return detections, proposals, proposal_scores, proposal_valid

    def _mask_probabilities(self, features: dict[str, Tensor], detections: Detections) -> Tensor:
        """f32[B, D, M, M] mask probabilities of the valid detections (boxes in resized pixels), 0 in empty slots.
        The mask head runs on the valid detections only: a photo fills a few of its D = 100 slots."""
        B, D = detections.labels.shape
        slots = detections.valid.view(-1).nonzero().squeeze(1)  # (B*D,) -> (V,)
        image = torch.div(slots, D, rounding_mode="floor")
        boxes = detections.boxes.view(B * D, 4)[slots]  # (B, D, 4) -> (V, 4)
        logits = self.mask_head(features, image_index_rois(image, boxes), detections.labels.view(B * D)[slots])
        M = self.mask_head.mask_size
        masks = logits.new_zeros((B * D, M, M), dtype=torch.float32).index_put((slots,), logits.float().sigmoid())
        return masks.view(B, D, M, M)  # (B*D, M, M) -> (B, D, M, M)

    @torch.no_grad()
    def inference(self, images: Tensor | Sequence[Tensor], return_proposals: bool = False, *,
                  masks: str = "dense") -> list[dict]:
        """Detections of a batch, one dict per image; the model must be in eval mode.

        Args:
            images: B tensors f32[3, H, W] in 0..1 (or f32[B, 3, H, W]).
            return_proposals: also return the RPN proposals ("proposals" f32[P_i, 4], "proposal_scores" f32[P_i])
                in original image pixels.
            masks: the form of "masks" (`mask_rle.MASK_FORMATS`): "dense" (torchvision's, pasted into the image),
                "rle" (COCO RLE of probability >= 0.5, never pasted densely: bounded memory for large images and
                many detections) or "boxed" (a `BoxMasks`, the box-relative probabilities, pasted on demand).
        Returns:
            B dicts {"boxes" f32[D_i, 4], "labels" i64[D_i], "scores" f32[D_i], "masks"}: "masks" is
            f32[D_i, 1, H, W] probabilities, D_i dicts {"size": [H, W], "counts": str}, or a `BoxMasks`.
        """
        if masks not in MASK_FORMATS:  # before the model runs
            raise ValueError(f"MaskRCNN.inference: masks must be one of {MASK_FORMATS}, got {masks!r}")
        batch = self._eval_batch(images)
        detections, proposals, proposal_scores, proposal_valid = self._detect(batch)
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        outputs = detections_in_format(detections, original_sizes, self.paste_mode, masks)
        if return_proposals:
            counts = proposal_valid.sum(dim=1).tolist()  # valid proposals are a prefix of every row
            proposals_original = self.transform.boxes_to_original(proposals, batch)  # (B, P, 4)
            for output, boxes, scores in zip(outputs, unpad(proposals_original, counts), unpad(proposal_scores, counts)):
                output["proposals"], output["proposal_scores"] = boxes, scores
        return outputs
