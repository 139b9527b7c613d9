"""`build_model`: the one place that turns a `ModelConfig` into constructor arguments, and `from_torchvision`,
which builds one with the weights and settings of a torchvision `maskrcnn_resnet50_fpn` or `_fpn_v2`."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

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
    ModelWeights,
    WeightsError,
    is_torchvision_state_dict,
    load_model_weights,
    load_state_dict_checked,
    read_model_weights,
    state_dict_architecture,
    torchvision_compatible_config,
    torchvision_settings,
)
from maskrcnn.model.rpn import RPN, RPNHead
from maskrcnn.model.transform import ImageTransform

logger = logging.getLogger(__name__)

# box_head.norm / mask_head.norm -> the norm layer after each head conv
_HEAD_NORMS: dict[str, Callable[[int], nn.Module] | None] = {"none": None, "batch": nn.BatchNorm2d}


def build_model(cfg: ModelConfig) -> MaskRCNN:
    """Builds a Mask R-CNN from a `ModelConfig`, loads `cfg.weights` and, with `cfg.cpu_speedups`, applies
    `cpu_speedups.optimize_for_cpu`; its CPU inference runs in `cfg.precision` (`precision.py`).

    Whole-model weights (`cfg.weights`) replace the backbone's: `cfg.backbone.weights` is then not loaded (nor
    downloaded), only its layout kept (FrozenBatchNorm2d, `trainable_layers`).

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
    whole = read_model_weights(cfg.weights) if cfg.weights != "none" else None
    backbone = _backbone(cfg, whole)
    transform = ImageTransform(min_size=cfg.transform.min_size, max_size=cfg.transform.max_size,
                               size_divisible=cfg.transform.size_divisible, fixed_canvas=cfg.transform.fixed_canvas,
                               image_mean=cfg.transform.image_mean, image_std=cfg.transform.image_std)
    model = MaskRCNN(transform=transform, backbone=backbone, rpn=_rpn(cfg), box_head=_box_head(cfg),
                     mask_head=_mask_head(cfg), paste_mode=cfg.paste_mode, precision=cfg.precision)
    if whole is not None:
        load_model_weights(model, whole)
    return optimize_for_cpu(model) if cfg.cpu_speedups else model


def _backbone(cfg: ModelConfig, whole: ModelWeights | None) -> nn.Module:
    """The backbone of `cfg`: its own weights loaded unless whole-model weights (`whole`) replace them; then it has
    the layout the model had when those were trained: pretrained (FrozenBatchNorm2d, the stages below
    `trainable_layers` frozen) for torchvision's and for a checkpoint trained from backbone weights, else as
    `cfg.backbone.norm` says."""
    b = cfg.backbone
    norm, weights = b.norm, b.weights
    if whole is not None and weights != "none":
        logger.info("model.backbone.weights=%s not loaded: model.weights replaces the whole model", weights)
        norm, weights = "frozen", "none"  # the layout those weights give; nothing read or fetched
    if whole is not None and whole.torchvision:
        if norm == "group":
            raise WeightsError(f"{whole.source}: torchvision's weights carry BatchNorm statistics; "
                               f"model.backbone.norm group cannot hold them, use batch")
        norm = "frozen"  # torchvision's detection weights come with frozen batch statistics
    return build_backbone(name=b.name, depth=b.depth, weights=weights, norm=norm, trainable_layers=b.trainable_layers,
                          out_channels=b.fpn_channels, fpn_norm=b.fpn_norm)


def _rpn(cfg: ModelConfig) -> RPN:
    r = cfg.rpn
    return RPN(head=RPNHead(in_channels=cfg.backbone.fpn_channels, num_anchors=len(r.aspect_ratios),
                            num_convs=r.num_convs),
               anchor_generator=AnchorGenerator(sizes=r.anchor_sizes, aspect_ratios=r.aspect_ratios),
               box_coder=BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)),
               matcher=Matcher(high_threshold=r.fg_iou_thresh, low_threshold=r.bg_iou_thresh,
                               allow_low_quality_matches=True),
               sampler=BalancedSampler(batch_size_per_image=r.batch_size_per_image,
                                       positive_fraction=r.positive_fraction),
               pre_nms_top_n_train=r.pre_nms_top_n_train, pre_nms_top_n_test=r.pre_nms_top_n_test,
               post_nms_top_n_train=r.post_nms_top_n_train, post_nms_top_n_test=r.post_nms_top_n_test,
               nms_thresh=r.nms_thresh, min_size=r.min_size, score_thresh=r.score_thresh)


def _box_head(cfg: ModelConfig) -> BoxHead:
    b = cfg.box_head
    return BoxHead(
        pooler=LevelRoIAlign(output_size=b.pooler_size, sampling_ratio=b.sampling_ratio,
                             aligned=cfg.roi_align_aligned, canonical_size=cfg.roi_canonical_size),
        in_channels=cfg.backbone.fpn_channels, representation_size=b.representation_size,
        num_classes=cfg.num_classes,
        matcher=Matcher(high_threshold=b.fg_iou_thresh, low_threshold=b.bg_iou_thresh,
                        allow_low_quality_matches=False),
        sampler=BalancedSampler(batch_size_per_image=b.batch_size_per_image, positive_fraction=b.positive_fraction),
        box_coder=BoxCoder(weights=b.bbox_reg_weights, clamp=math.log(1000.0 / 16)),
        score_thresh=b.score_thresh, nms_thresh=b.nms_thresh, detections_per_img=b.detections_per_img,
        num_convs=b.num_convs, conv_channels=b.conv_channels, num_fcs=b.num_fcs, norm_layer=_HEAD_NORMS[b.norm])


def _mask_head(cfg: ModelConfig) -> MaskHead:
    m = cfg.mask_head
    return MaskHead(
        pooler=LevelRoIAlign(output_size=m.pooler_size, sampling_ratio=m.sampling_ratio,
                             aligned=cfg.roi_align_aligned, canonical_size=cfg.roi_canonical_size),
        in_channels=cfg.backbone.fpn_channels, conv_channels=m.conv_channels, num_convs=m.num_convs,
        num_classes=cfg.num_classes, loss_weight=m.loss_weight, norm_layer=_HEAD_NORMS[m.norm])


def from_torchvision(model_or_state_dict: nn.Module | dict[str, Tensor], **overrides) -> MaskRCNN:
    """Our `MaskRCNN` with the weights of a torchvision `maskrcnn_resnet50_fpn` (v1) or `maskrcnn_resnet50_fpn_v2`
    (its 2-conv RPN head, 4-conv + 1-FC box head and mask head with BatchNorm, FPN with BatchNorm).

    Args:
        model_or_state_dict: the torchvision model (its transform sizes and RPN / RoI-head thresholds are
            copied too) or its state dict (torchvision's default settings are used).
        overrides: `ModelConfig` fields to replace, e.g. `transform=TransformConfig(min_size=320, ...)` or
            `paste_mode="exact"`. The speed layer (`cpu_speedups`, on by default) only rounds differently;
            `cpu_speedups=False` reproduces torchvision's float operations in the same order (bit-equal boxes and
            scores on CPU).
    Returns:
        MaskRCNN in eval mode; the class count and the layers (v1 or v2) are read from the weights' shapes and keys.
    """
    is_module = isinstance(model_or_state_dict, nn.Module)
    state = model_or_state_dict.state_dict() if is_module else model_or_state_dict
    if not is_torchvision_state_dict(state):
        raise WeightsError("from_torchvision: not a torchvision Mask R-CNN state dict "
                           "(no roi_heads.box_predictor.cls_score.weight)")
    state = from_torchvision_state_dict(state)
    cfg = state_dict_architecture(state, torchvision_compatible_config(1))
    if is_module:
        cfg = torchvision_settings(model_or_state_dict, cfg)
    model = build_model(dataclasses.replace(cfg, **overrides))
    load_state_dict_checked(model, state, "from_torchvision")
    return model.eval()
