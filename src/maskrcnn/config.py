"""Typed, frozen configuration: the only home of default values.

A `Config` is four sections (model, data, train, eval). `load_config` reads YAML, applies dotted overrides
(`train.lr=0.01`) and checks every key and type, so a typo is an error naming the key rather than a silent default.
Model modules never import this file: `build_model` turns a `ModelConfig` into constructor arguments.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from maskrcnn.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key is unknown, has the wrong type or an invalid value; the message names the key."""


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet"  # resnet | efficientnet_lite0..2 (these expect transform image_mean 0.498, image_std 0.502)
    depth: int = 50  # ResNet depth: 18, 34, 50 or 101
    weights: str = "none"  # none | imagenet (torchvision's ResNet; Lite: from pip, maskrcnn[lite]) | path to weights
    norm: str = "batch"  # from scratch: batch | group (ResNet only); pretrained weights (these or torchvision's model.weights) use FrozenBatchNorm
    trainable_layers: int = 3  # stages (Lite: strides) left trainable when pretrained (these weights, torchvision's model.weights), 0..5, last first; earlier ones frozen (torchvision's trainable_backbone_layers, default 3)
    fpn_channels: int = 256  # channels of every FPN output level p2..p6
    fpn_norm: str = "auto"  # normalisation after the FPN convs: auto (GroupNorm with norm group, none otherwise) | none | batch (torchvision v2) | group


@dataclass(frozen=True)
class TransformConfig:
    min_size: int | None = 800  # shortest image edge after resize; None keeps the image size
    max_size: int | None = 1333  # longest image edge after resize is at most this; None: no limit
    size_divisible: int = 32  # batch canvas padded to a multiple of this
    fixed_canvas: tuple[int, int] | None = None  # (H, W) canvas of every batch, e.g. (800, 1088); CUDA training then uses cudnn.benchmark
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet mean, images in 0..1
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet std


@dataclass(frozen=True)
class RPNConfig:
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one anchor size per FPN level p2..p6, pixels
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor height / width ratios at every level
    fg_iou_thresh: float = 0.7  # anchor is positive at IoU >= this with a GT box
    bg_iou_thresh: float = 0.3  # anchor is negative at IoU < this with every GT box
    batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    positive_fraction: float = 0.5  # at most this fraction of the sampled anchors is positive
    pre_nms_top_n_train: int = 2000  # top-scoring anchors kept per FPN level before NMS, training
    pre_nms_top_n_test: int = 1000  # same, inference
    post_nms_top_n_train: int = 2000  # proposals kept per image after NMS, training
    post_nms_top_n_test: int = 1000  # same, inference
    nms_thresh: float = 0.7  # IoU threshold of the proposal NMS
    min_size: float = 1e-3  # proposals narrower or shorter than this (pixels) are removed
    score_thresh: float = 0.0  # proposals with objectness probability below this are removed
    num_convs: int = 1  # 3x3 conv + ReLU layers of the RPN head shared by all levels (torchvision v2: 2)


@dataclass(frozen=True)
class BoxHeadConfig:
    pooler_size: int = 7  # RoIAlign output size
    sampling_ratio: int = 2  # RoIAlign sampling points per bin side
    representation_size: int = 1024  # width of the FC layers
    num_convs: int = 0  # 3x3 convs (+ norm) + ReLU on the pooled RoI features before the FC layers (torchvision v2: 4)
    conv_channels: int = 256  # channels of those convs
    num_fcs: int = 2  # FC layers, 1 or 2 (v1: 2, fc6 and fc7; torchvision v2: 1)
    norm: str = "none"  # normalisation after each of those convs: none | batch (torchvision v2)
    fg_iou_thresh: float = 0.5  # proposal is foreground at IoU >= this
    bg_iou_thresh: float = 0.5  # proposal is background at IoU < this
    batch_size_per_image: int = 512  # RoIs sampled per image for the loss
    positive_fraction: float = 0.25  # at most this fraction of the sampled RoIs is foreground
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # box coder weights (wx, wy, ww, wh)
    score_thresh: float = 0.05  # detections scoring below this are dropped at inference
    nms_thresh: float = 0.5  # per-class NMS IoU threshold at inference
    detections_per_img: int = 100  # detections kept per image at inference


@dataclass(frozen=True)
class MaskHeadConfig:
    pooler_size: int = 14  # RoIAlign output size; the predicted mask is twice this (28)
    sampling_ratio: int = 2  # RoIAlign sampling points per bin side
    conv_channels: int = 256  # channels of the four 3x3 convs
    num_convs: int = 4  # number of 3x3 convs before the deconv
    norm: str = "none"  # normalisation after each 3x3 conv: none | batch (torchvision v2)
    loss_weight: float = 1.0  # factor of the mask loss in the total training loss (the paper: 1)


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int | None = 3  # foreground classes (background, label 0, is added by the model); null: as many as the training data have
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # ResNet + FPN
    transform: TransformConfig = field(default_factory=TransformConfig)  # normalise, resize, pad
    rpn: RPNConfig = field(default_factory=RPNConfig)  # region proposal network
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)  # RoI classification and box refinement
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)  # RoI masks
    weights: str = "none"  # whole-model weights, replacing backbone.weights (not loaded then): none | torchvision-coco (v1) | torchvision-coco-v2 (needs its architecture: the finetune preset) | path to one of our checkpoints or a state dict (ours or torchvision's); class layers re-initialised for another num_classes
    roi_align_aligned: bool = True  # half-pixel-correct RoIAlign (Detectron2); False reproduces torchvision v1
    roi_canonical_size: float = 224.0  # RoIs of this side (sqrt of the area, px) are pooled from p4, twice it from p5, half from p3 (FPN eq. 1); for images of about 800 px
    paste_mode: str = "exact"  # mask paste: exact (sub-pixel, bilinear) | torchvision (its integer-rounded paste)
    precision: str = "fp32"  # inference: fp32 | bf16 (on the CPU: backbone and heads, needs AVX-512 BF16 or AMX; on CUDA: autocast) | auto (CPU: the faster, timed on the first calls, fp32 without bf16 units; CUDA: bf16)
    cpu_speedups: bool = True  # model/cpu_speedups.py: NHWC convs, measured weight-gradient layout, BatchNorm folded at eval, RoIAlign read from NHWC maps; same weights, results equal up to float rounding


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataConfig:
    # annotations converted to COCO in memory by their tool's reader (labelme | yolo-seg | voc | cvat) or read as is:
    format: str = "synthetic"  # synthetic | coco | pennfudan | cis680 | labelme | yolo-seg | voc | cvat
    root: str = ""  # pennfudan: the PennFudanPed folder; cis680: the folder of the h5/npy files; coco: unused
    train_images: str = ""  # coco: folder of the training images
    train_annotations: str = ""  # coco: instances json of the training images
    val_images: str = ""  # coco: folder of the validation images
    val_annotations: str = ""  # coco: instances json of the validation images
    num_val: int = 50  # pennfudan: images held out for validation (the last ones of a seeded permutation)
    val_fraction: float = 0.2  # cis680: fraction held out for validation (seeded random split)
    split_seed: int = 1  # seed of the train/val split (pennfudan, cis680)
    drop_empty: bool = True  # coco: drop training images without usable annotations
    synthetic_train_size: int = 200  # synthetic: number of training images
    synthetic_val_size: int = 50  # synthetic: number of validation images
    synthetic_image_size: tuple[int, int] = (128, 128)  # synthetic: (H, W) of every image
    synthetic_num_classes: int = 3  # synthetic: number of shape classes
    synthetic_seed: int = 0  # synthetic: seed; validation images use a different stream
    flip_prob: float = 0.5  # probability of a horizontal flip of a training image
    large_scale_jitter: bool = False  # training images resized by a random factor of jitter_scale_range, then cropped / padded to jitter_canvas (Ghiasi et al., CVPR 2021)
    jitter_scale_range: tuple[float, float] = (0.1, 2.0)  # large-scale jitter: (low, high) resize factor, 1 = the image fits the canvas
    jitter_canvas: tuple[int, int] = (1024, 1024)  # large-scale jitter: (H, W) of every training image; about the model's input size
    copy_paste_prob: float = 0.0  # probability that a training image gets each instance of another training image pasted on with probability 1/2 (simple copy-paste); 0: off
    colour_jitter: float = 0.0  # training images' brightness, contrast, saturation jitter (factor in [1 - x, 1 + x]) and hue jitter (x / 4); 0: off
    min_instance_pixels: int = 16  # after a jitter crop or a paste, instances left with fewer mask pixels are dropped
    num_workers: int = 0  # DataLoader worker processes
    aspect_ratio_grouping: bool = True  # batch images of the same orientation together


# ----------------------------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.02  # base learning rate for the total batch (all processes); scale it linearly with the total batch
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 / decoupled weight decay
    batch_size: int = 2  # images per iteration of ONE process; under torchrun the total batch is this x processes
    max_iters: int = 1000  # iterations to train
    max_minutes: float | None = None  # training time budget: the schedule is fitted to the measured speed, and training stops when it is spent
    warmup_iters: int = 200  # iterations of linear warm-up (at most half of the planned schedule)
    warmup_factor: float = 0.001  # learning rate at the first warm-up iteration, as a fraction of lr
    schedule: str = "step"  # step | cosine (after warm-up)
    steps: tuple[int, ...] = ()  # step schedule: iterations at which the lr is multiplied by gamma
    gamma: float = 0.1  # step schedule decay factor
    clip_grad_norm: float | None = None  # clip the global gradient norm to this; None: no clipping
    amp: bool = True  # training on CUDA: bf16 autocast (on the CPU, train.precision decides; inference: model.precision)
    precision: str = "fp32"  # CPU training: fp32 | bf16 (autocast, fp32 master weights; needs AVX-512 BF16 or AMX) | auto (the faster, timed on the first steps; fp32 without bf16 units)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | str | None = None  # CPU threads of torch: N; auto: the faster of one per core and 1, timed on the first steps (engine/threads.py); None: torch's default (one per core)
    seed: int = 0  # seed of every random generator
    log_period: int = 10  # iterations between log lines (terminal, log.txt, metrics.jsonl, TensorBoard)
    eval_period: int = 0  # iterations between evaluations; 0: only at the end
    patience: int | None = None  # early stopping: after this many evaluations in a row without a better validation mask AP, the schedule anneals over a short tail (a tenth of the iterations trained) and the run stops; best.pt keeps the best; 0 or None: off (needs eval_period)
    checkpoint_period: int = 500  # iterations between checkpoints (last.pt); the end always writes one
    out_dir: str = "runs/default"  # run directory: checkpoints, metrics, figures, report
    sync_batchnorm: bool = False  # torchrun: BatchNorm statistics over every process's images (trainable BatchNorm only)
    tensorboard: bool = False  # also write losses, lr and APs as TensorBoard scalars to out_dir/tb (pip install maskrcnn[tensorboard])


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 2  # images per inference batch
    iou_thresh: float = 0.5  # IoU of the original project's per-class AP (its mAP)
    max_images: int | None = None  # evaluate only the first N images; None: all
    num_vis: int = 24  # images pictured in the report's browsable page (the first 2 also in the stage pictures)
    vis_score_thresh: float = 0.5  # detections drawn in the report's pictures score at least this
    vis_proposals: int = 20  # top proposals drawn in the RPN picture
    device: str = "auto"  # evaluation and prediction of a checkpoint: auto (CUDA when there is one) | cpu | cuda | cuda:N | mps; a training evaluates on its own device, train.device
    mask_ceiling: bool = True  # also the mask AP that the model's boxes allow (report: "Masks against their boxes"): two more mask pastes and COCOevals, about 0.2 s an image of 100 detections at 640x480 on 2 cores


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # network
    data: DataConfig = field(default_factory=DataConfig)  # data set and loading
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation and pictures


# ------------------------------------------------------------------------------------- load and check

_CHOICES = {
    "model.backbone.name": ("resnet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
    "model.backbone.depth": (18, 34, 50, 101),
    "model.backbone.norm": ("batch", "group"),
    "model.backbone.fpn_norm": ("auto", "none", "batch", "group"),
    "model.box_head.norm": ("none", "batch"),
    "model.mask_head.norm": ("none", "batch"),
    "model.paste_mode": ("exact", "torchvision"),
    "model.precision": ("auto", "fp32", "bf16"),
    "data.format": ("synthetic", "coco", "pennfudan", "cis680", "labelme", "yolo-seg", "voc", "cvat"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("step", "cosine"),
    "train.precision": ("auto", "fp32", "bf16"),
}




def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value >= low), f"at least {low}"


def _above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value > low), f"above {low}"


def _between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> tuple[Callable[[Any], bool], str]:
    def test(value: Any) -> bool:
        return (low < value if open_low else low <= value) and (value < high if open_high else value <= high)

    return test, f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


_PROBABILITY = _between(0.0, 1.0)
_FRACTION = _between(0.0, 1.0, open_low=True)  # 0 would sample or keep nothing

# The range of every number whose type alone does not make it valid. Checked at load, before any work starts, so
# that `train.log_period: 0` is an error naming the key instead of a ZeroDivisionError hours later. A rule on a
# tuple applies to each element; a None value (where the field allows None) or a word (auto) is not checked here.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.num_classes": _at_least(1),
    "model.roi_canonical_size": _above(0.0),
    "model.backbone.trainable_layers": _between(0, 5),
    "model.backbone.fpn_channels": _at_least(1),
    "model.transform.min_size": _at_least(1),
    "model.transform.max_size": _at_least(1),
    "model.transform.size_divisible": _at_least(1),
    "model.transform.fixed_canvas": _at_least(1),
    "model.transform.image_std": _above(0.0),
    "model.rpn.anchor_sizes": _above(0),
    "model.rpn.aspect_ratios": _above(0.0),
    "model.rpn.fg_iou_thresh": _PROBABILITY,
    "model.rpn.bg_iou_thresh": _PROBABILITY,
    "model.rpn.batch_size_per_image": _at_least(1),
    "model.rpn.positive_fraction": _FRACTION,
    "model.rpn.pre_nms_top_n_train": _at_least(1),
    "model.rpn.pre_nms_top_n_test": _at_least(1),
    "model.rpn.post_nms_top_n_train": _at_least(1),
    "model.rpn.post_nms_top_n_test": _at_least(1),
    "model.rpn.nms_thresh": _FRACTION,
    "model.rpn.min_size": _at_least(0.0),
    "model.rpn.score_thresh": _PROBABILITY,
    "model.rpn.num_convs": _at_least(1),
    "model.box_head.pooler_size": _at_least(1),
    "model.box_head.sampling_ratio": _at_least(0),
    "model.box_head.representation_size": _at_least(1),
    "model.box_head.num_convs": _at_least(0),
    "model.box_head.conv_channels": _at_least(1),
    "model.box_head.num_fcs": _between(1, 2),
    "model.box_head.fg_iou_thresh": _PROBABILITY,
    "model.box_head.bg_iou_thresh": _PROBABILITY,
    "model.box_head.batch_size_per_image": _at_least(1),
    "model.box_head.positive_fraction": _FRACTION,
    "model.box_head.bbox_reg_weights": _above(0.0),
    "model.box_head.score_thresh": _PROBABILITY,
    "model.box_head.nms_thresh": _FRACTION,
    "model.box_head.detections_per_img": _at_least(1),
    "model.mask_head.pooler_size": _at_least(1),
    "model.mask_head.sampling_ratio": _at_least(0),
    "model.mask_head.conv_channels": _at_least(1),
    "model.mask_head.num_convs": _at_least(0),
    "model.mask_head.loss_weight": _above(0.0),
    "data.num_val": _at_least(0),
    "data.val_fraction": _between(0.0, 1.0, open_high=True),
    "data.synthetic_train_size": _at_least(1),
    "data.synthetic_val_size": _at_least(1),
    "data.synthetic_image_size": _at_least(1),
    "data.synthetic_num_classes": _at_least(1),
    "data.flip_prob": _PROBABILITY,
    "data.jitter_scale_range": _above(0.0),
    "data.jitter_canvas": _at_least(1),
    "data.copy_paste_prob": _PROBABILITY,
    "data.colour_jitter": _PROBABILITY,
    "data.min_instance_pixels": _at_least(1),
    "data.num_workers": _at_least(0),
    "train.lr": _above(0.0),
    "train.momentum": _between(0.0, 1.0, open_high=True),
    "train.weight_decay": _at_least(0.0),
    "train.batch_size": _at_least(1),
    "train.max_iters": _at_least(0),
    "train.max_minutes": _at_least(0.0),
    "train.warmup_iters": _at_least(0),
    "train.warmup_factor": _FRACTION,
    "train.steps": _at_least(1),
    "train.gamma": _above(0.0),
    "train.clip_grad_norm": _above(0.0),
    "train.num_threads": _at_least(1),
    "train.log_period": _at_least(1),
    "train.eval_period": _at_least(0),
    "train.patience": _at_least(0),
    "train.checkpoint_period": _at_least(0),
    "eval.batch_size": _at_least(1),
    "eval.iou_thresh": _FRACTION,
    "eval.max_images": _at_least(1),
    "eval.num_vis": _at_least(0),
    "eval.vis_score_thresh": _PROBABILITY,
    "eval.vis_proposals": _at_least(0),
}

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps")  # train.device / eval.device values torch can run on


def _lookup(config: Config, key: str) -> Any:
    value: Any = config
    for name in key.split("."):
        value = getattr(value, name)
    return value


def check_config(config: Config) -> Config:
    """Checks the values that the types alone leave open (ranges, pairs of fields, the device name, the run
    directory); returns `config` unchanged.

    Raises:
        ConfigError: the first bad value, naming its key.
    """
    for key, (test, wanted) in _RANGES.items():
        value = _lookup(config, key)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, (int, float)) and not test(item):  # None and words (auto) are checked below
                raise ConfigError(f"{key}: must be {wanted}, got {value!r:.80}")
    transform = config.model.transform
    if transform.min_size is not None and transform.max_size is not None and transform.min_size > transform.max_size:
        raise ConfigError(f"model.transform.min_size ({transform.min_size}) is larger than model.transform.max_size "
                          f"({transform.max_size})")
    low, high = config.data.jitter_scale_range
    if low > high:
        raise ConfigError(f"data.jitter_scale_range: low ({low}) is above high ({high})")
    for head in ("rpn", "box_head"):
        section = getattr(config.model, head)
        if section.bg_iou_thresh > section.fg_iou_thresh:
            raise ConfigError(f"model.{head}.bg_iou_thresh ({section.bg_iou_thresh}) is above model.{head}."
                              f"fg_iou_thresh ({section.fg_iou_thresh})")
    backbone = config.model.backbone
    if backbone.norm == "group" and backbone.name != "resnet":
        raise ConfigError(f"model.backbone.norm: group is for ResNet only; {backbone.name}'s channel counts (16, 24, "
                          f"40, ...) do not divide into groups of 32, use batch")
    if backbone.norm == "group" and backbone.weights != "none":
        raise ConfigError(f"model.backbone.norm: group is for training from scratch; model.backbone.weights "
                          f"{backbone.weights!r:.200} carry BatchNorm statistics, use batch with them")
    steps = config.train.steps
    if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        raise ConfigError(f"train.steps: must be increasing, got {list(steps)}")
    if config.train.patience and not config.train.eval_period:
        raise ConfigError(f"train.patience: {config.train.patience} counts evaluations on the way, but "
                          f"train.eval_period is 0 (only the end evaluates): set train.eval_period or patience 0")
    if isinstance(config.train.num_threads, str) and config.train.num_threads != "auto":
        raise ConfigError(f"train.num_threads: must be a number of threads, auto or null, got "
                          f"{config.train.num_threads!r:.80}")
    for key, device in (("train.device", config.train.device), ("eval.device", config.eval.device)):
        if not DEVICE_PATTERN.fullmatch(device):
            raise ConfigError(f"{key}: must be auto, cpu, cuda, cuda:N or mps, got {device!r:.80}")
    if not config.train.out_dir:
        raise ConfigError("train.out_dir: must name a folder, got ''")
    if Path(config.train.out_dir).exists() and not Path(config.train.out_dir).is_dir():
        raise ConfigError(f"train.out_dir: {config.train.out_dir} exists and is not a folder")
    return config


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks `value` against a type annotation (after `from __future__ import annotations`, a string
    resolved by `typing.get_type_hints`) and converts lists to tuples and ints to floats where the type says so."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: null is not allowed")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(annotation, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r:.80}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r:.80}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r:.80}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r:.80}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r:.80}")
        return value
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a (possibly partial) nested dict, naming the first bad key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        coerced = _coerce(value, hints[name], key)
        if key in _CHOICES and coerced not in _CHOICES[key]:
            raise ConfigError(f"{key}: must be one of {_CHOICES[key]}, got {coerced!r}")
        kwargs[name] = coerced
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for name, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _merge(merged[name], value)
        else:
            merged[name] = value
    return merged


# Bounds on what a config may cost to read: a config is about 150 values, so these leave room for any real file
# while a YAML "billion laughs" (aliases of aliases, cheap to parse, exponential to walk) fails at once.
MAX_CONFIG_BYTES = 1 << 20  # size of a YAML config file
MAX_CONFIG_NODES = 10_000  # values (mappings, lists and scalars) after expanding every alias


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads `1e-4` as a float: YAML 1.1 (PyYAML) wants a dot in floats, so it reads
    `1e-4` as the string '1e-4', which every user means as a number."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _count_nodes(value: Any, source: str) -> None:
    """Raises ConfigError once the values reached through `value` (aliases counted every time they are used, as
    every later walk over the config would meet them) exceed MAX_CONFIG_NODES; stops there, so it is cheap."""
    pending, count = [value], 0
    while pending:
        item = pending.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"{source}: more than {MAX_CONFIG_NODES} values once its YAML aliases are expanded "
                              f"(an alias bomb?); a config needs a few hundred")
        if isinstance(item, dict):
            pending += item.values()
        elif isinstance(item, list):
            pending += item


def parse_yaml(text: str, source: str) -> Any:
    """Parses config YAML (`1e-4` is a float) and bounds its size.

    Args:
        text: the YAML document.
        source: the file or override named in errors.
    Raises:
        ConfigError: invalid YAML, or more than MAX_CONFIG_BYTES characters or MAX_CONFIG_NODES values.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters, more than a config may have ({MAX_CONFIG_BYTES})")
    try:
        value = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None
    except RecursionError:  # PyYAML composes nested lists and mappings recursively
        raise ConfigError(f"{source}: lists or mappings nested too deeply for a config") from None
    _count_nodes(value, source)
    return value


def parse_override(text: str) -> dict:
    """'train.lr=0.01' -> {'train': {'lr': 0.01}}; the value is parsed as YAML (numbers, lists, null, true)."""
    if "=" not in text:
        raise ConfigError(f"override '{text:.200}' must look like key.path=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{text:.200}' has an empty key")
    value = parse_yaml(raw, f"override '{text:.200}'")
    nested: dict = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


def config_from_dict(values: dict, overrides: list[str] = ()) -> Config:
    """Builds a checked `Config` from nested dict values plus dotted overrides."""
    for text in overrides:
        values = _merge(values, parse_override(text))
    return check_config(_build(Config, values))


PRESETS_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package; ./configs links here


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """A config named by the user is neither a file nor a preset; the message lists the presets."""


def preset_path(name: str) -> Path:
    """The YAML file of a preset shipped inside the package (`demo`, `seed`, `coco`, ...)."""
    return PRESETS_DIR / f"{name}.yaml"


def preset_names() -> list[str]:
    """Every preset usable by name: the .yaml files of the package's configs folder."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def config_path(name: str | Path) -> Path:
    """The YAML file a config is named by: an existing file, else a preset's name (`seed`, `coco`, ...).

    Raises:
        ConfigNotFoundError: neither a file nor a preset.
    """
    path = Path(name)
    if path.is_file():
        return path
    if str(name) in preset_names():
        return preset_path(str(name))
    raise ConfigNotFoundError(f"config not found: {name} is neither a file nor a preset "
                              f"({', '.join(preset_names())})")


def read_config_file(path: str | Path) -> dict:
    """The raw nested values of a YAML config file or a preset's (not yet checked against `Config`).

    Args:
        path: a YAML file or a preset's name (`config_path`).
    Raises:
        ConfigNotFoundError: neither a file nor a preset.
        ConfigError: not a YAML mapping, not UTF-8, or over the size bounds (MAX_CONFIG_BYTES, MAX_CONFIG_NODES).
    """
    path = config_path(path)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than a config may have ({MAX_CONFIG_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    values = parse_yaml(text, str(path)) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return values


# Config keys that hold a file or folder; the other values they may take are words, not paths.
PATH_KEYS = ("data.root", "data.train_images", "data.train_annotations", "data.val_images", "data.val_annotations",
             "model.weights", "model.backbone.weights")
PATH_WORDS = ("", "none", "imagenet", "torchvision-coco", "torchvision-coco-v2")


def _resolve_paths(values: dict, folder: Path, prefix: str = "") -> dict:
    """`values` (nested, as read from a YAML file) with the relative paths of PATH_KEYS joined to `folder`, the
    file's folder, so that a config file means the same from any working directory."""
    resolved = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            value = _resolve_paths(value, folder, f"{key}.")
        elif key in PATH_KEYS and isinstance(value, str) and value not in PATH_WORDS:
            path = Path(value).expanduser()
            value = str(path if path.is_absolute() else folder / path)
        resolved[name] = value
    return resolved


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Loads a YAML file or a preset by name (None: all defaults), applies `key.path=value` overrides and checks
    the result.

    Paths (data folders and json files, weight files) become absolute: relative ones in the file are relative to
    the file's folder, those in `overrides` to the working directory, as typed. The run's saved config.yaml thus
    means the same wherever it is read from.

    Raises:
        ConfigNotFoundError: neither a file nor a preset.
        ConfigError: invalid YAML, an unknown key, a wrong type or a value outside its choices; names the key.
    """
    path = None if path is None else config_path(path)
    values = {} if path is None else _resolve_paths(read_config_file(path), path.resolve().parent)
    try:
        for text in overrides:
            values = _merge(values, _resolve_paths(parse_override(text), Path.cwd()))
        return config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None


def config_to_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML / JSON / checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
