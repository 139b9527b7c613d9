"""Weights from elsewhere: torchvision's COCO Mask R-CNNs (v1 and v2), torchvision's ImageNet ResNets, backbone
files, our own checkpoints, and the settings under which converted torchvision weights reproduce torchvision's
detections.

Every load goes through `load_state_dict_checked`, so a file that does not fit is one `WeightsError` naming it.
Key renaming between torchvision and this package is `convert.py`'s; building a model from a torchvision model
(`from_torchvision`) is `build.py`'s, which uses what is here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models

from maskrcnn.config import BoxHeadConfig, ModelConfig, RPNConfig, TransformConfig
from maskrcnn.errors import UserError
from maskrcnn.model.convert import CLASS_DEPENDENT_PREFIXES, from_torchvision_state_dict

logger = logging.getLogger(__name__)

_V1_NEEDS = "model.weights=torchvision-coco needs model.backbone.depth=50 and fpn_channels=256"
_V2_NEEDS = ("model.weights=torchvision-coco-v2 needs v2's architecture, as the finetune preset has it: "
             "model.backbone.depth=50, fpn_channels=256, fpn_norm=batch; model.rpn.num_convs=2; "
             "model.box_head.num_convs=4, num_fcs=1, norm=batch; model.mask_head.norm=batch")
# model.weights words -> (torchvision's weights, downloaded once into the torch hub cache; what they need)
TORCHVISION_COCO = {
    "torchvision-coco": (models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1, _V1_NEEDS),
    "torchvision-coco-v2": (models.detection.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, _V2_NEEDS),
}


class WeightsError(UserError, ValueError):
    """Weights cannot be read, fetched, or do not fit the model; the message names their source."""


def load_state_dict_checked(module: nn.Module, state: dict[str, Tensor], source: str, *,
                            skip_prefixes: Sequence[str] = (), hint: str = "") -> None:
    """`module.load_state_dict(state)`, strict, with one error that names the source of the weights.

    Args:
        module: the model or part to load into.
        state: its state dict (keys relative to `module`).
        source: where the weights come from (a path, "torchvision COCO_V1"), for the error message.
        skip_prefixes: keys of `module` starting with these may be missing from `state` (they keep their values).
        hint: what the weights need, added to the error message (e.g. "model.backbone.depth=50").
    Raises:
        WeightsError: missing or unexpected keys, or shapes that differ (the first such key with both shapes).
    """
    needs = f" ({hint})" if hint else ""
    own = module.state_dict()
    differ = [key for key, value in state.items() if key in own and value.shape != own[key].shape]
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise WeightsError(f"{source}: weights do not fit this {type(module).__name__}{needs}: {differ[0]} has shape "
                           f"{list(state[differ[0]].shape)} in the weights, {list(own[differ[0]].shape)} in the "
                           f"model{more}")
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        first = str(error).strip().splitlines()[-1].strip()
        raise WeightsError(f"{source}: weights do not fit this {type(module).__name__}{needs}: {first}") from None
    missing = [key for key in missing if not key.startswith(tuple(skip_prefixes))]
    if missing or unexpected:
        raise WeightsError(f"{source}: weights do not fit this {type(module).__name__}{needs}; "
                           f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def first_non_finite(state_dict: dict[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor that holds a NaN or an infinity, or None."""
    for name, value in state_dict.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def read_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    """The state dict in `path` (a bare state dict or a checkpoint dict with key "model"), tensors only.

    Raises:
        FileNotFoundError: no such file. WeightsError: the file holds something else, or a NaN / infinite weight.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refuses arbitrary objects (and code) in the file
        raise WeightsError(f"{what}: {path} holds objects other than tensors and plain containers, refused by "
                           f"torch.load(weights_only=True): {str(error)[:300]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise WeightsError(f"{what}: {path} holds a {type(state).__name__}, not a state dict of tensors")
    bad = first_non_finite(state)
    if bad is not None:
        raise WeightsError(f"{what}: {path}: weight {bad} holds NaN or infinite values (a model with it predicts "
                           f"nothing)")
    return state


@dataclasses.dataclass(frozen=True)
class ModelWeights:
    """Whole-model weights (`ModelConfig.weights`) as read, before a model is built for them."""

    state: dict[str, Tensor]  # in this package's key names (torchvision's converted)
    source: str  # where they come from, for messages: the path or "torchvision <weights enum>"
    hint: str  # what they need of the model, for the message when they do not fit
    torchvision: bool  # torchvision's (v1 or v2): trained with frozen BatchNorm statistics in the ResNet


def read_model_weights(weights: str) -> ModelWeights:
    """Reads whole-model weights: "torchvision-coco" or "torchvision-coco-v2" (torchvision's COCO weights,
    `TORCHVISION_COCO`, downloaded once into the torch hub cache), or a path to one of our checkpoints (dict with
    key "model"), to a bare state dict of our model, or to a torchvision Mask R-CNN state dict (v1 or v2).

    Raises:
        FileNotFoundError: no such file. WeightsError: unreadable, not downloadable, or non-finite.
    """
    if weights in TORCHVISION_COCO:
        torchvision_weights, hint = TORCHVISION_COCO[weights]
        state = _fetch(torchvision_weights, f"model.weights={weights}", "give that file's path as model.weights")
        source = f"torchvision {torchvision_weights}"
    else:
        source = weights
        state = read_state_dict(Path(weights), "model.weights (none, torchvision-coco, torchvision-coco-v2 or a path)")
        hint = "the model section of the config it was trained with"
    torchvision = is_torchvision_state_dict(state)
    if torchvision:
        hint = _V2_NEEDS if "roi_heads.box_head.0.0.weight" in state else _V1_NEEDS
        state = from_torchvision_state_dict(state)
    return ModelWeights(state=state, source=source, hint=hint, torchvision=torchvision)


def load_model_weights(model: nn.Module, weights: ModelWeights) -> None:
    """Loads whole-model weights into a freshly built `MaskRCNN`, for any class count: when the weights have
    another number of classes than the model, the class-dependent layers (`convert.CLASS_DEPENDENT_PREFIXES`) keep
    their fresh initialisation (fine-tuning), and the log says so.

    Raises:
        WeightsError: they do not fit the model (one line naming the first key that does not fit, with both shapes,
            or the missing and unexpected keys).
    """
    skipped = _class_layers_to_reinitialise(model, weights.state, weights.source)
    state = {key: value for key, value in weights.state.items() if not key.startswith(skipped)}
    load_state_dict_checked(model, state, weights.source, skip_prefixes=skipped, hint=weights.hint)


def is_torchvision_state_dict(state: dict[str, Tensor]) -> bool:
    """Whether `state` has torchvision's Mask R-CNN key names (v1 or v2) rather than ours."""
    return "roi_heads.box_predictor.cls_score.weight" in state


def _class_layers_to_reinitialise(model: nn.Module, state: dict[str, Tensor], source: str) -> tuple[str, ...]:
    """CLASS_DEPENDENT_PREFIXES when `state` (our key names) has another class count than `model`, logged; else ()."""
    predictor = state.get("box_head.cls_score.weight")
    ours = model.box_head.num_classes
    if predictor is None or predictor.shape[0] - 1 == ours:
        return ()
    logger.info("model.weights %s: %d classes, the model %d: class-dependent layers %s re-initialised; every other "
                "layer loaded", source, predictor.shape[0] - 1, ours,
                ", ".join(prefix.rstrip(".") for prefix in CLASS_DEPENDENT_PREFIXES))
    return CLASS_DEPENDENT_PREFIXES


def load_resnet_weights(body: nn.Module, imagenet: models.WeightsEnum | Path) -> None:
    """Loads torchvision's ImageNet weights (downloaded or found in the torch hub cache) or a torchvision ResNet
    state dict file into a ResNet trunk; the classifier `fc.*` is dropped."""
    if isinstance(imagenet, Path):
        state, source = read_state_dict(imagenet, "backbone weights"), str(imagenet)
    else:
        hint = "fetch that file elsewhere and give its local path as the backbone weights instead of 'imagenet'"
        state, source = _fetch(imagenet, "model.backbone.weights=imagenet", hint), f"torchvision {imagenet}"
    load_state_dict_checked(body, {key: value for key, value in state.items() if not key.startswith("fc.")}, source,
                            hint="wrong depth?")


def load_backbone_file(backbone: nn.Module, path: Path) -> None:
    """Loads a torchvision ResNet state dict (`conv1.weight`, `layer1.*`) or a whole-backbone state dict
    (`body.*`, `fpn.*`) from `path` into a ResNet-FPN backbone, detecting which by the keys."""
    state = read_state_dict(path, "backbone weights (give 'none', 'imagenet' or a path)")
    if any(key.startswith("body.") for key in state):
        load_state_dict_checked(backbone, state, str(path), hint="wrong depth or layout?")
    elif "conv1.weight" in state:
        load_resnet_weights(backbone.body, path)
    else:
        raise WeightsError(f"{path}: neither a ResNet state dict (conv1.weight, layer1.*) nor a backbone state dict "
                           f"(body.*, fpn.*); first keys: {list(state)[:5]}")


def _fetch(weights: models.WeightsEnum, setting: str, hint: str) -> dict[str, Tensor]:
    """torchvision's file for `weights`, downloaded into the torch hub cache when it is not there yet, read like
    every other weights file (`read_state_dict`: weights_only, finiteness).

    Why not torchvision's `weights.get_state_dict`: it unpickles with torch.load's default, weights_only=False in
    this torch, so a crafted file in the hub cache (where the offline hint below tells users to put it) would run
    its code.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cache.is_file():
        # the file name holds the first digits of its SHA-256 (torchvision's check_hash): a wrong file is refused
        digits = torch.hub.HASH_REGEX.search(cache.name)
        logger.info("downloading %s to %s", weights.url, cache)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(cache), digits.group(1) if digits else None,
                                           progress=False)
        except Exception as error:  # URLError, socket and SSL errors, HTTP errors, a wrong hash: "could not fetch"
            raise WeightsError(f"{setting}: cannot download {weights.url} ({error}); put the file at {cache}, or "
                               f"{hint}") from None
    return read_state_dict(cache, setting)


def torchvision_compatible_config(num_classes: int) -> ModelConfig:
    """The settings under which a converted torchvision model reproduces torchvision's detections: ResNet-50,
    RoIAlign aligned=False, torchvision's mask paste, min 800 / max 1333 and its thresholds (v1's architecture;
    v2's from its weights: `state_dict_architecture`)."""
    return ModelConfig(num_classes=num_classes, roi_align_aligned=False, paste_mode="torchvision",
                       transform=TransformConfig(min_size=800, max_size=1333, size_divisible=32),
                       rpn=RPNConfig(), box_head=BoxHeadConfig())


def state_dict_architecture(state: dict[str, Tensor], cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the architecture of a Mask R-CNN state dict in our key names (e.g. converted from torchvision's v1
    or v2): class count, FPN width and norm, RPN convs, box head convs / norm / FC layers and widths, mask head
    convs / norm / width. The backbone's depth is cfg's.

    Raises:
        WeightsError: a key every Mask R-CNN state dict has is missing.
    """
    required = ("box_head.cls_score.weight", "box_head.fc6.weight", "backbone.fpn.inner_blocks.0.0.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise WeightsError(f"not a Mask R-CNN state dict: no {missing[0]}")

    def count(pattern: str) -> int:
        return sum(1 for key in state if re.fullmatch(pattern, key))

    def norm(prefix: str) -> str:  # BatchNorm leaves running statistics; no norm leaves nothing
        return "batch" if f"{prefix}.running_mean" in state else "none"

    box_convs, mask_convs = count(r"box_head\.convs\.\d+\.weight"), count(r"mask_head\.convs\.\d+\.weight")
    return dataclasses.replace(
        cfg, num_classes=state["box_head.cls_score.weight"].shape[0] - 1,
        backbone=dataclasses.replace(cfg.backbone, fpn_channels=state["backbone.fpn.inner_blocks.0.0.weight"].shape[0],
                                     fpn_norm=norm("backbone.fpn.inner_blocks.0.1")),
        rpn=dataclasses.replace(cfg.rpn, num_convs=count(r"rpn\.head\.conv\.\d+\.0\.weight")),
        box_head=dataclasses.replace(
            cfg.box_head, num_convs=box_convs, norm=norm("box_head.norms.0"),
            conv_channels=state["box_head.convs.0.weight"].shape[0] if box_convs else cfg.box_head.conv_channels,
            num_fcs=2 if "box_head.fc7.weight" in state else 1,
            representation_size=state["box_head.fc6.weight"].shape[0]),
        mask_head=dataclasses.replace(
            cfg.mask_head, num_convs=mask_convs, norm=norm("mask_head.norms.0"),
            conv_channels=state["mask_head.convs.0.weight"].shape[0] if mask_convs else cfg.mask_head.conv_channels))


def torchvision_settings(model: nn.Module, cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the sizes and thresholds a torchvision `MaskRCNN` module was configured with."""
    transform, rpn, heads = model.transform, model.rpn, model.roi_heads
    # the RPN's public pre/post_nms_top_n() answer for its current mode: ask a shallow copy in each mode
    rpn_train, rpn_test = copy.copy(rpn), copy.copy(rpn)
    rpn_train.training, rpn_test.training = True, False
    return dataclasses.replace(
        cfg,
        transform=dataclasses.replace(cfg.transform, min_size=int(transform.min_size[-1]),
                                      max_size=int(transform.max_size), size_divisible=int(transform.size_divisible),
                                      image_mean=tuple(transform.image_mean), image_std=tuple(transform.image_std)),
        rpn=dataclasses.replace(cfg.rpn, pre_nms_top_n_train=rpn_train.pre_nms_top_n(),
                                pre_nms_top_n_test=rpn_test.pre_nms_top_n(),
                                post_nms_top_n_train=rpn_train.post_nms_top_n(),
                                post_nms_top_n_test=rpn_test.post_nms_top_n(), nms_thresh=rpn.nms_thresh,
                                min_size=rpn.min_size, score_thresh=rpn.score_thresh),
        box_head=dataclasses.replace(cfg.box_head, score_thresh=heads.score_thresh, nms_thresh=heads.nms_thresh,
                                     detections_per_img=heads.detections_per_img))
