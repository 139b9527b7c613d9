"""Weights from elsewhere: torchvision's COCO Mask R-CNN, torchvision's ImageNet ResNets, backbone files, our own
checkpoints, and the settings under which converted torchvision weights reproduce torchvision's detections.

Every load goes through `load_state_dict_checked`, so a file that does not fit is one `WeightsError` naming it.
Key renaming between torchvision and this package is `convert.py`'s; building a model from a torchvision model
(`from_torchvision`) is `build.py`'s, which uses what is here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models

from maskrcnn.config import BoxHeadConfig, ModelConfig, RPNConfig, TransformConfig
from maskrcnn.errors import UserError
from maskrcnn.model.convert import CLASS_DEPENDENT_PREFIXES, from_torchvision_state_dict

logger = logging.getLogger(__name__)


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
        WeightsError: missing or unexpected keys, or shapes that differ.
    """
    needs = f" ({hint})" if hint else ""
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


def load_model_weights(model: nn.Module, weights: str) -> None:
    """Loads whole-model weights (`ModelConfig.weights`) into a freshly built `MaskRCNN`.

    Args:
        model: the model.
        weights: "torchvision-coco" (see `load_torchvision_coco`) or a path to one of our checkpoints (dict with
            key "model") or to a bare state dict of this model.
    """
    if weights == "torchvision-coco":
        load_torchvision_coco(model)
        return
    path = Path(weights)
    what = "model.weights (none, torchvision-coco or a checkpoint path)"
    load_state_dict_checked(model, read_state_dict(path, what), str(path))


def load_torchvision_coco(model: nn.Module) -> None:
    """Loads torchvision's `MaskRCNN_ResNet50_FPN_Weights.COCO_V1` into a `MaskRCNN` (downloaded once into the
    torch hub cache). When the model has another number of classes than COCO's 90, the class-dependent predictor
    layers keep their fresh initialisation (fine-tuning)."""
    weights = models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    state = from_torchvision_state_dict(_fetch(weights, "model.weights=torchvision-coco", "give a checkpoint path"))
    num_classes = state["box_head.cls_score.weight"].shape[0] - 1
    skipped: tuple[str, ...] = ()
    if num_classes != model.box_head.num_classes:
        skipped = CLASS_DEPENDENT_PREFIXES
        state = {key: value for key, value in state.items() if not key.startswith(skipped)}
        logger.info("torchvision-coco weights have %d classes, the model %d: predictor layers %s stay freshly "
                    "initialised", num_classes, model.box_head.num_classes, ", ".join(skipped))
    load_state_dict_checked(model, state, f"torchvision {weights}", skip_prefixes=skipped,
                            hint="model.weights=torchvision-coco needs model.backbone.depth=50 and fpn_channels=256")


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
    """The settings under which a converted torchvision v1 model reproduces torchvision's detections:
    ResNet-50, RoIAlign aligned=False, torchvision's mask paste, min 800 / max 1333 and its thresholds."""
    return ModelConfig(num_classes=num_classes, roi_align_aligned=False, paste_mode="torchvision",
                       transform=TransformConfig(min_size=800, max_size=1333, size_divisible=32),
                       rpn=RPNConfig(), box_head=BoxHeadConfig())


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
