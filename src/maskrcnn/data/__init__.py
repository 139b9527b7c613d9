"""Data sets (COCO json, Penn-Fudan, the original CIS680 files, synthetic shapes), paired transforms and loaders.

Every data set returns (image uint8[3, H, W], target) with target = {"boxes": f32[N, 4] xyxy px, "labels": i64[N]
in 1..K, "masks": u8[N, H, W], "image_id": int}, and has `class_names` and `image_size(i) -> (h, w)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from maskrcnn.config import Config, ConfigError, DataConfig
from maskrcnn.data.cis680 import CIS680Dataset
from maskrcnn.data.coco import CocoDataset, build_coco_subset, read_coco_index
from maskrcnn.data.common import DatasetError
from maskrcnn.data.formats import SOURCE_FORMATS, convert_source
from maskrcnn.data.loader import build_eval_loader, build_train_loader, collate
from maskrcnn.data.pennfudan import PennFudanDataset, default_pennfudan_root, fetch_pennfudan
from maskrcnn.data.synthetic import SyntheticShapes
from maskrcnn.data.transforms import (
    ColourJitter, Compose, CopyPaste, CopyPasteDataset, LargeScaleJitter, RandomHorizontalFlip, ResizeShortestEdge,
)

__all__ = [
    "CIS680Dataset", "CocoDataset", "ColourJitter", "Compose", "CopyPaste", "CopyPasteDataset", "DatasetError",
    "LargeScaleJitter", "PennFudanDataset", "RandomHorizontalFlip", "ResizeShortestEdge", "SyntheticShapes",
    "build_coco_subset", "build_dataset", "build_eval_loader", "build_train_loader", "collate", "data_source",
    "dataset_categories", "describe_categories", "fetch_pennfudan", "read_coco_index", "train_transform",
    "with_num_classes",
]


def train_transform(cfg: DataConfig) -> Callable[[Tensor, dict], tuple[Tensor, dict]] | None:
    """The per-sample training augmentations the config turns on, in order: horizontal flip, large-scale jitter,
    colour jitter; None when none is on. A flip alone is the bare `RandomHorizontalFlip`, as before the others
    existed, so that presets without them draw the same random numbers."""
    steps: list[Callable[[Tensor, dict], tuple[Tensor, dict]]] = []
    if cfg.flip_prob > 0:
        steps.append(RandomHorizontalFlip(cfg.flip_prob))
    if cfg.large_scale_jitter:
        steps.append(LargeScaleJitter(cfg.jitter_canvas, cfg.jitter_scale_range, cfg.min_instance_pixels))
    if cfg.colour_jitter > 0:
        steps.append(ColourJitter(cfg.colour_jitter))
    return None if not steps else steps[0] if len(steps) == 1 else Compose(steps)


def build_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The data set `cfg.format` names, for split "train" (the augmentations of `train_transform`, and copy-paste
    between training images with `cfg.copy_paste_prob`) or "val" (no augmentation; COCO validation keeps images
    without annotations).

    Raises:
        DatasetError: a path the format needs is not set in the config, or the data are bad.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    dataset = _build_format(cfg, split)
    if split == "train" and cfg.copy_paste_prob > 0:
        return CopyPasteDataset(dataset, CopyPaste(min_pixels=cfg.min_instance_pixels), prob=cfg.copy_paste_prob)
    return dataset


def _build_format(cfg: DataConfig, split: str) -> Dataset:
    """The data set of `cfg.format` for `split`, with the per-sample transforms of that split."""
    train = split == "train"
    transform = train_transform(cfg) if train else None
    if cfg.format == "synthetic":
        return SyntheticShapes(num_images=cfg.synthetic_train_size if train else cfg.synthetic_val_size,
                               image_size=cfg.synthetic_image_size, num_classes=cfg.synthetic_num_classes,
                               seed=cfg.synthetic_seed, split=split, transform=transform)
    if cfg.format == "coco":
        images, annotations = (cfg.train_images, cfg.train_annotations) if train else (cfg.val_images,
                                                                                          cfg.val_annotations)
        for key, value in ((f"data.{split}_images", images), (f"data.{split}_annotations", annotations)):
            if not value:
                raise DatasetError(f"{key} is not set: COCO-format data need --set data.train_images=DIR --set "
                                   f"data.train_annotations=FILE.json --set data.val_images=DIR --set "
                                   f"data.val_annotations=FILE.json")
        return CocoDataset(images_dir=images, annotations=annotations, drop_empty=cfg.drop_empty and train,
                           transform=transform)
    if cfg.format in SOURCE_FORMATS:
        return _converted(cfg, split, transform)
    if cfg.format == "pennfudan":
        return PennFudanDataset(root=cfg.root or default_pennfudan_root(), split=split, num_val=cfg.num_val,
                                split_seed=cfg.split_seed, transform=transform)
    if cfg.format == "cis680":
        if not cfg.root:
            raise DatasetError("data.root is not set: data.format=cis680 needs --set data.root=DIR, the folder of the "
                               "original project's hw3_mycocodata_* h5/npy files")
        return CIS680Dataset(root=cfg.root, split=split, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                             transform=transform)
    raise DatasetError(f"data.format: unknown format {cfg.format!r}")


def _converted(cfg: DataConfig, split: str, transform: Callable | None) -> CocoDataset:
    """The annotations of a labelling tool (data.format labelme, yolo-seg, voc, cvat), converted to COCO in memory.

    The source is data.{split}_annotations (a LabelMe folder, a YOLO dataset yaml or folder, a VOC folder, a CVAT
    XML), whole, or else data.root (yolo-seg, voc) whose part named `split` is read: the yaml's key, the
    ImageSets/Segmentation list. A dataset yaml always gives its part named `split`. cvat: data.{split}_images is
    the images' folder (default: images/ beside the XML).
    """
    train = split == "train"
    source = cfg.train_annotations if train else cfg.val_annotations
    from_root = not source and cfg.format in ("yolo-seg", "voc")
    source = cfg.root if from_root else source
    if not source:
        raise DatasetError(f"data.{split}_annotations is not set: data.format={cfg.format} needs --set "
                           f"data.train_annotations=SOURCE --set data.val_annotations=SOURCE"
                           + (" (or data.root=SOURCE with train and val parts)" if cfg.format in ("yolo-seg", "voc")
                              else ""))
    yaml_source = cfg.format == "yolo-seg" and not Path(source).is_dir()
    images = (cfg.train_images if train else cfg.val_images) or None
    conversion = convert_source(cfg.format, source, split=split if from_root or yaml_source else None,
                                images_dir=images if cfg.format == "cvat" else None)
    return CocoDataset(images_dir=conversion.images_dir, annotations=source, drop_empty=cfg.drop_empty and train,
                       transform=transform, coco_dict=conversion.coco)


def dataset_categories(dataset: Dataset) -> list[dict]:
    """The classes of a data set, [{"id": category id, "name": name}] for labels 1..K in order: a COCO json's own
    category ids, the labels themselves for the other formats. Plain values (checkpoints store them)."""
    ids = getattr(dataset, "label_to_category_id", None) or {}
    return [{"id": ids.get(label, label), "name": str(name)} for label, name in enumerate(dataset.class_names, start=1)]


def describe_categories(categories: list[dict], shown: int = 6) -> str:
    """'3 classes (car, person, dog)' for error messages; long lists are cut after `shown` names."""
    names = [c["name"] for c in categories]
    listed = ", ".join(names[:shown]) + (f", ... {names[-1]}" if len(names) > shown else "")
    return f"{len(names)} class{'es' if len(names) != 1 else ''} ({listed})"


def data_source(cfg: DataConfig, split: str) -> str:
    """What a split's data are, for messages: the json, the folder or the format."""
    return (cfg.train_annotations if split == "train" else cfg.val_annotations) or cfg.root or f"{cfg.format} data"


def with_num_classes(cfg: Config, train_set: Dataset, val_set: Dataset | None = None) -> Config:
    """`cfg` with `model.num_classes` taken from the training data when it is null (auto), after checking that the
    model's classes are the data's and that the validation data have the training data's classes.

    Raises:
        ConfigError: model.num_classes differs from the training data's class count, or the validation data's
            classes differ from the training data's; one line naming both.
    """
    train_categories = dataset_categories(train_set)
    if val_set is not None:
        val_categories = dataset_categories(val_set)
        if [c["name"] for c in val_categories] != [c["name"] for c in train_categories]:
            raise ConfigError(f"the validation data ({data_source(cfg.data, 'val')}) have "
                              f"{describe_categories(val_categories)} but the training data "
                              f"({data_source(cfg.data, 'train')}) have {describe_categories(train_categories)}")
    count = len(train_categories)
    if cfg.model.num_classes is None:
        return replace(cfg, model=replace(cfg.model, num_classes=count))
    if cfg.model.num_classes != count:
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the training data "
                          f"({data_source(cfg.data, 'train')}) have {describe_categories(train_categories)}; set "
                          f"model.num_classes={count}, or null to take the data's count")
    return cfg
