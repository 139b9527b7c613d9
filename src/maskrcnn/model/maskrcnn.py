"""Mask R-CNN (He et al. 2017) assembled from its parts, with torchvision's calling convention, and
`build_model`, the one place that turns a `ModelConfig` into constructor arguments.

Shape letters: B images, G GT boxes per image (padded), P proposals per image, R RoIs of the batch,
D detections per image (padded), K foreground classes, M mask size.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.config import ModelConfig
from maskrcnn.model.anchors import AnchorGenerator
from maskrcnn.model.backbone import build_backbone
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.box_head import BoxHead, LevelRoIAlign, image_index_rois, proposal_rois
from maskrcnn.model.layout import nchw_copy, use_layout_convs
from maskrcnn.model.mask_head import MaskHead, stack_masks
from maskrcnn.model.matcher import BalancedSampler, Matcher
from maskrcnn.model.postprocess import PASTE_MODES, paste_masks
from maskrcnn.model.rpn import RPN, RPNHead
from maskrcnn.model.transform import ImageTransform, sizes_tensor
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
        channels_last: run the convolutions in NHWC memory layout. Measured on CPU (1 thread, 800x1088,
            ResNet-50): backbone 2.18 s -> 1.89 s per image at inference, train step (2 images) 21.3 s -> 19.1 s.
            Weights are unchanged; outputs differ only by float summation order. The 3x3 convolutions become
            `layout.LayoutConv2d`, which on CPU takes the weight gradient from NCHW copies where oneDNN's NHWC
            one is slow (see model/layout.py).
        fuse_batchnorm: in eval mode, run a copy of the backbone with every BatchNorm folded into the conv
            before it, rebuilt after every `train()` / `eval()` call and whenever a backbone tensor is replaced
            or changed in place (optimizer steps, load_state_dict; not writes through `.data`). Measured:
            backbone 2.02 s -> 1.65 s per 800x1088 image on CPU; outputs differ only by float rounding (about
            1e-4 on the features).
    """

    def __init__(self, *, transform: ImageTransform, backbone: nn.Module, rpn: RPN, box_head: BoxHead,
                 mask_head: MaskHead, paste_mode: str = "exact", channels_last: bool = True,
                 fuse_batchnorm: bool = True) -> None:
        super().__init__()
        if paste_mode not in PASTE_MODES:
            raise ValueError(f"MaskRCNN: paste_mode must be one of {PASTE_MODES}, got {paste_mode!r}")
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.box_head = box_head
        self.mask_head = mask_head
        self.paste_mode = paste_mode
        self.channels_last = channels_last
        self.fuse_batchnorm = fuse_batchnorm
        self._fused_backbone: tuple[tuple, nn.Module] | None = None  # (weights key, fused copy), see _features
        if channels_last:
            self.to(memory_format=torch.channels_last)
            use_layout_convs(self)

    def train(self, mode: bool = True) -> MaskRCNN:
        """nn.Module.train; also drops the fused inference backbone, so that it is rebuilt from the weights."""
        self._fused_backbone = None
        return super().train(mode)

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
        features, roi_features = self._features(batch)
        proposals, _, proposal_valid, losses = self.rpn(batch, features, gt_boxes, gt_valid)

        sample = self.box_head.sample(proposals, proposal_valid, gt_boxes, gt_labels, gt_valid)
        class_logits, box_deltas = self.box_head(roi_features, sample.rois)
        losses.update(self.box_head.loss(class_logits, box_deltas, sample))

        num_pos = sample.num_positive
        positive_rois = sample.rois[:num_pos]  # (Rp, 5)
        mask_logits = self.mask_head(roi_features, positive_rois, sample.labels[:num_pos])  # (Rp, M, M)
        # matched GT row -> row of the stacked masks of the whole batch (valid GT rows come first per image)
        counts = gt_valid.sum(dim=1)  # (B,)
        first_row = torch.cumsum(counts, 0) - counts
        gt_index = first_row[positive_rois[:, 0].to(torch.int64)] + sample.matched_gt[:num_pos]  # (Rp,)
        gt_masks = stack_masks([t["masks"].to(device) for t in targets])  # (N, 1, Hm, Wm)
        mask_targets = self.mask_head.targets(positive_rois, gt_index, gt_masks, batch.scales)
        losses["loss_mask"] = self.mask_head.loss(mask_logits, mask_targets)
        return {key: losses[key] for key in LOSS_KEYS}

    def _features(self, batch: ImageBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """FPN features {"p2".."p6"} for the RPN, and the levels the RoI heads pool from, NCHW-contiguous."""
        images = batch.tensor
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.inference_backbone()(images)
        # roi_align's kernels read NCHW: convert each pooled level once here rather than in each of the
        # per-level roi_align calls of both heads (measured: box head 0.62 s -> 0.44 s at 800x1088)
        pooled = dict.fromkeys(self.box_head.pooler.featmap_names + self.mask_head.pooler.featmap_names)
        return features, {name: nchw_copy(features[name]) for name in pooled}

    def inference_backbone(self) -> nn.Module:
        """The backbone, or in eval mode (with fuse_batchnorm) its BatchNorm-folded copy, cached per weights."""
        if self.training or not self.fuse_batchnorm:
            return self.backbone
        # data pointers and in-place version counters change with every optimizer step, load_state_dict or .to()
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in self.backbone.state_dict().values())
        if self._fused_backbone is None or self._fused_backbone[0] != key:
            self._fused_backbone = (key, fuse_batchnorm(self.backbone))
        return self._fused_backbone[1]

    @torch.no_grad()
    def inference(self, images: Sequence[Tensor], return_proposals: bool = False) -> list[dict[str, Tensor]]:
        """Detections of a batch, whatever the module's mode (BatchNorm still follows train / eval).

        Args:
            images: B tensors f32[3, H, W] in 0..1.
            return_proposals: also return the RPN proposals ("proposals" f32[P, 4], "proposal_scores" f32[P])
                in original image pixels.
        Returns:
            B dicts {"boxes" f32[D, 4], "labels" i64[D], "scores" f32[D], "masks" f32[D, 1, H, W]}.
        """
        was_training = self.training
        # the RPN and the transform pick their test-time settings from the mode
        self.rpn.train(False)
        self.transform.train(False)
        try:
            batch, _ = self.transform(images)
            features, roi_features = self._features(batch)
            proposals, proposal_scores, proposal_valid, _ = self.rpn(batch, features)
        finally:
            self.rpn.train(was_training)
            self.transform.train(was_training)
        return self._detect(batch, roi_features, proposals, proposal_scores, proposal_valid, return_proposals)

    def _detect(self, batch: ImageBatch, features: dict[str, Tensor], proposals: Tensor, proposal_scores: Tensor,
                proposal_valid: Tensor, return_proposals: bool) -> list[dict[str, Tensor]]:
        """Box head, mask head and paste for the proposals of a batch -> one output dict per image."""
        num_images = len(batch)
        device = batch.tensor.device
        rois = proposal_rois(proposals, proposal_valid)  # (R, 5)
        class_logits, box_deltas = self.box_head(features, rois)
        detections = self.box_head.predict(class_logits.float(), box_deltas.float(), rois,
                                           sizes_tensor(batch.image_sizes, device), num_images)
        counts_tensor = detections.valid.sum(dim=1)  # (B,)
        counts = counts_tensor.tolist()  # the host sync of this stage: the output sizes
        # valid is a prefix of every row, so (image, slot) of each detection follow from the counts, no nonzero
        image = torch.repeat_interleave(torch.arange(num_images, device=device), counts_tensor, output_size=sum(counts))
        slot = torch.arange(image.shape[0], device=device) - (torch.cumsum(counts_tensor, 0) - counts_tensor)[image]
        boxes = detections.boxes[image, slot]  # (sum D_i, 4) resized pixels
        labels = detections.labels[image, slot]
        mask_logits = self.mask_head(features, image_index_rois(image, boxes), labels)  # (sum D_i, M, M)
        boxes_original = self.transform.boxes_to_original(detections.boxes, batch)[image, slot]
        masks_per_image = paste_masks(mask_logits.float().sigmoid(), boxes_original, counts, batch.original_sizes,
                                      mode=self.paste_mode)
        if return_proposals:
            proposals_original = self.transform.boxes_to_original(proposals, batch)  # (B, P, 4)
        outputs = []
        for index, (boxes_i, labels_i, scores_i, masks_i) in enumerate(zip(
                boxes_original.split(counts), labels.split(counts),
                detections.scores[image, slot].split(counts), masks_per_image)):
            output = {"boxes": boxes_i, "labels": labels_i, "scores": scores_i, "masks": masks_i}
            if return_proposals:
                keep = proposal_valid[index]
                output["proposals"] = proposals_original[index][keep]
                output["proposal_scores"] = proposal_scores[index][keep]
            outputs.append(output)
        return outputs


@torch.no_grad()
def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` (in eval mode) in which every BatchNorm2d / FrozenBatchNorm2d registered
    right after a Conv2d in the same parent (torchvision's ResNet stem, blocks and downsample layers) is folded
    into that conv: conv(x) * s + t == conv'(x) with w' = w * s, b' = b * s + t, s = gamma / sqrt(var + eps)."""
    fused = copy.deepcopy(module).eval().requires_grad_(False)
    for parent in fused.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                    norm.eps, norm.weight, norm.bias)
                conv.weight, conv.bias = weight.requires_grad_(False), bias.requires_grad_(False)
                setattr(parent, norm_name, nn.Identity())
    return fused


def build_model(cfg: ModelConfig) -> MaskRCNN:
    """Builds a Mask R-CNN from a `ModelConfig` (and loads `cfg.weights`).

    Args:
        cfg: the model section of the config.
    Returns:
        MaskRCNN in train mode.
    Raises:
        FileNotFoundError: `cfg.weights` names a file that does not exist.
        RuntimeError: torchvision's COCO weights cannot be downloaded (offline) or a checkpoint does not fit.
    """
    if cfg.num_classes < 1:
        raise ValueError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    norm = cfg.backbone.norm
    if cfg.weights == "torchvision-coco" and norm == "batch":
        norm = "frozen"  # torchvision's detection weights come with frozen batch statistics
    backbone = build_backbone(depth=cfg.backbone.depth, weights=cfg.backbone.weights, norm=norm,
                              trainable_layers=cfg.backbone.trainable_layers, out_channels=cfg.backbone.fpn_channels)
    channels = cfg.backbone.fpn_channels
    transform = ImageTransform(min_size=cfg.transform.min_size, max_size=cfg.transform.max_size,
                               size_divisible=cfg.transform.size_divisible, fixed_canvas=cfg.transform.fixed_canvas,
                               image_mean=cfg.transform.image_mean, image_std=cfg.transform.image_std)
    r = cfg.rpn
    rpn = RPN(head=RPNHead(in_channels=channels, num_anchors=len(r.aspect_ratios)),
              anchor_generator=AnchorGenerator(sizes=r.anchor_sizes, aspect_ratios=r.aspect_ratios),
              box_coder=BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)),
              matcher=Matcher(high_threshold=r.fg_iou_thresh, low_threshold=r.bg_iou_thresh,
                              allow_low_quality_matches=True),
              sampler=BalancedSampler(batch_size_per_image=r.batch_size_per_image,
                                      positive_fraction=r.positive_fraction),
              pre_nms_top_n_train=r.pre_nms_top_n_train, pre_nms_top_n_test=r.pre_nms_top_n_test,
              post_nms_top_n_train=r.post_nms_top_n_train, post_nms_top_n_test=r.post_nms_top_n_test,
              nms_thresh=r.nms_thresh, min_size=r.min_size, score_thresh=r.score_thresh)
    b = cfg.box_head
    box_head = BoxHead(
        pooler=LevelRoIAlign(output_size=b.pooler_size, sampling_ratio=b.sampling_ratio,
                             aligned=cfg.roi_align_aligned),
        in_channels=channels, representation_size=b.representation_size, num_classes=cfg.num_classes,
        matcher=Matcher(high_threshold=b.fg_iou_thresh, low_threshold=b.bg_iou_thresh,
                        allow_low_quality_matches=False),
        sampler=BalancedSampler(batch_size_per_image=b.batch_size_per_image, positive_fraction=b.positive_fraction),
        box_coder=BoxCoder(weights=b.bbox_reg_weights, clamp=math.log(1000.0 / 16)),
        score_thresh=b.score_thresh, nms_thresh=b.nms_thresh, detections_per_img=b.detections_per_img)
    m = cfg.mask_head
    mask_head = MaskHead(
        pooler=LevelRoIAlign(output_size=m.pooler_size, sampling_ratio=m.sampling_ratio,
                             aligned=cfg.roi_align_aligned),
        in_channels=channels, conv_channels=m.conv_channels, num_convs=m.num_convs, num_classes=cfg.num_classes)
    model = MaskRCNN(transform=transform, backbone=backbone, rpn=rpn, box_head=box_head, mask_head=mask_head,
                     paste_mode=cfg.paste_mode, channels_last=cfg.channels_last, fuse_batchnorm=cfg.fuse_batchnorm)
    if cfg.weights != "none":
        load_weights(model, cfg.weights)
    return model


def load_weights(model: MaskRCNN, weights: str) -> None:
    """Loads whole-model weights into `model`.

    Args:
        model: a freshly built model.
        weights: "torchvision-coco" (torchvision's COCO_V1 Mask R-CNN weights, converted; the class-dependent
            predictor layers are skipped when the model has another number of classes) or a path to a
            checkpoint dict with key "model" or to a bare state dict of this model.
    """
    if weights == "torchvision-coco":
        from maskrcnn.model.convert import load_torchvision_coco  # convert imports this module

        load_torchvision_coco(model)
        return
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: no such file {path} (expected none, torchvision-coco or a "
                                f"checkpoint path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refuses arbitrary objects (and code) in the file
        raise RuntimeError(f"model.weights: {path} holds objects other than tensors and plain containers, "
                           f"refused by torch.load(weights_only=True): {str(error)[:300]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise RuntimeError(f"model.weights: {path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"model.weights: {path} does not fit this model: {error}") from None
