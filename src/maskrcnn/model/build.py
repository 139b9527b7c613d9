"""`build_model`: the one place that turns a `ModelConfig` into constructor arguments, and `from_torchvision`,
which builds one with the weights and settings of a torchvision `maskrcnn_resnet50_fpn`."""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor, nn

from maskrcnn.config import ModelConfig
from maskrcnn.model.anchors import AnchorGenerator
from maskrcnn.model.backbone import build_backbone
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.box_head import BoxHead
from maskrcnn.model.convert import from_torchvision_state_dict
from maskrcnn.model.cpu_speedups import optimize_for_cpu
from maskrcnn.model.mask_head import MaskHead
from maskrcnn.model.maskrcnn import MaskRCNN
from maskrcnn.model.matcher import BalancedSampler, Matcher
from maskrcnn.model.poolers import LevelRoIAlign
from maskrcnn.model.pretrained import (
    WeightsError,
    load_model_weights,
    load_state_dict_checked,
    torchvision_compatible_config,
    torchvision_settings,
)
from maskrcnn.model.rpn import RPN, RPNHead
from maskrcnn.model.transform import ImageTransform


def build_model(cfg: ModelConfig) -> MaskRCNN:
    """Builds a Mask R-CNN from a `ModelConfig`, loads `cfg.weights` and, with `cfg.cpu_speedups`, applies
    `cpu_speedups.optimize_for_cpu`; its CPU inference runs in `cfg.precision` (`precision.py`).

    Args:
        cfg: the model section of the config.
    Returns:
        MaskRCNN in train mode.
    Raises:
        FileNotFoundError: `cfg.weights` names a file that does not exist.
        WeightsError: torchvision's weights cannot be downloaded (offline) or the weights do not fit.
        PrecisionError: `cfg.precision` is bf16 and the CPU has no bf16 units.
    """
    if cfg.num_classes < 1:
        raise ValueError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    norm = cfg.backbone.norm
    if cfg.weights == "torchvision-coco" and norm == "batch":
        norm = "frozen"  # torchvision's detection weights come with frozen batch statistics
    backbone = build_backbone(name=cfg.backbone.name, depth=cfg.backbone.depth, weights=cfg.backbone.weights, norm=norm,
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
                             aligned=cfg.roi_align_aligned, canonical_size=cfg.roi_canonical_size),
        in_channels=channels, representation_size=b.representation_size, num_classes=cfg.num_classes,
        matcher=Matcher(high_threshold=b.fg_iou_thresh, low_threshold=b.bg_iou_thresh,
                        allow_low_quality_matches=False),
        sampler=BalancedSampler(batch_size_per_image=b.batch_size_per_image, positive_fraction=b.positive_fraction),
        box_coder=BoxCoder(weights=b.bbox_reg_weights, clamp=math.log(1000.0 / 16)),
        score_thresh=b.score_thresh, nms_thresh=b.nms_thresh, detections_per_img=b.detections_per_img)
    m = cfg.mask_head
    mask_head = MaskHead(
        pooler=LevelRoIAlign(output_size=m.pooler_size, sampling_ratio=m.sampling_ratio,
                             aligned=cfg.roi_align_aligned, canonical_size=cfg.roi_canonical_size),
        in_channels=channels, conv_channels=m.conv_channels, num_convs=m.num_convs, num_classes=cfg.num_classes,
        loss_weight=m.loss_weight)
    model = MaskRCNN(transform=transform, backbone=backbone, rpn=rpn, box_head=box_head, mask_head=mask_head,
                     paste_mode=cfg.paste_mode, precision=cfg.precision)
    if cfg.weights != "none":
        load_model_weights(model, cfg.weights)
    return optimize_for_cpu(model) if cfg.cpu_speedups else model


def from_torchvision(model_or_state_dict: nn.Module | dict[str, Tensor], **overrides) -> MaskRCNN:
    """Our `MaskRCNN` with the weights of a torchvision `maskrcnn_resnet50_fpn` (v1).

    Args:
        model_or_state_dict: the torchvision model (its transform sizes and RPN / RoI-head thresholds are
            copied too) or its state dict (torchvision's default settings are used).
        overrides: `ModelConfig` fields to replace, e.g. `transform=TransformConfig(min_size=320, ...)` or
            `paste_mode="exact"`. The speed layer (`cpu_speedups`, on by default) only rounds differently;
            `cpu_speedups=False` reproduces torchvision's float operations in the same order (bit-equal boxes and
            scores on CPU).
    Returns:
        MaskRCNN in eval mode; num_classes is inferred from the predictor's shape.
    """
    is_module = isinstance(model_or_state_dict, nn.Module)
    state = model_or_state_dict.state_dict() if is_module else model_or_state_dict
    if "roi_heads.box_predictor.cls_score.weight" not in state:
        raise WeightsError("from_torchvision: not a torchvision Mask R-CNN state dict "
                           "(no roi_heads.box_predictor.cls_score.weight)")
    num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    cfg = torchvision_compatible_config(num_classes)
    if is_module:
        cfg = torchvision_settings(model_or_state_dict, cfg)
    model = build_model(dataclasses.replace(cfg, **overrides))
    load_state_dict_checked(model, from_torchvision_state_dict(state), "from_torchvision")
    return model.eval()
