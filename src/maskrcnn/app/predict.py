"""Prediction on image files and folders: overlays, COCO results and a record per image.

A checkpoint runs through evaluation's inference step (`inference.detect_batch`), an exported model (.onnx, .pt2)
through its predictor from `maskrcnn.export`; both become a `Detector`, so that everything after the model is
the same for either.

Shape letters: D detections of one image, H/W the image's size.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from maskrcnn.data import read_coco_index
from maskrcnn.data.common import DatasetError, read_rgb
from maskrcnn.engine.checkpoint import LoadedModel, check_categories, load_model
from maskrcnn.engine.coco_results import detections_to_coco
from maskrcnn.engine.common import cuda_autocast, output_to_cpu
from maskrcnn.engine.inference import detect_batch
from maskrcnn.errors import UserError
from maskrcnn.export.exporter import SUFFIXES
from maskrcnn.fileio import write_text_atomic
from maskrcnn.viz.draw import draw_detections, save_png

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# One image in, its detections out: uint8 [3, H, W] -> {"boxes" f32[D, 4], "labels" i64[D], "scores" f32[D],
# "masks" f32[D, 1, H, W]} on the CPU, in the image's coordinates.
Detector = Callable[[Tensor], dict]


def image_paths(inputs: list[str | Path]) -> list[Path]:
    """The image files named or held (directly) by the inputs, each once, in the order given (folders sorted).

    Raises:
        UserError: an input does not exist, or a folder holds no image file.
    """
    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            if not found:
                raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise UserError(f"image or folder not found: {path}")
    seen: set[str] = set()
    unique = []
    for path in paths:  # a file named twice (or named and inside a named folder) is predicted once
        if os.path.abspath(path) not in seen:
            seen.add(os.path.abspath(path))
            unique.append(path)
    return unique


def overlay_names(paths: list[Path]) -> list[Path]:
    """Overlay file of every image, relative to the output folder: the image's path below the deepest folder that
    holds all of them, its whole name kept (a/x.jpg -> a/x.jpg_pred.png), so that a/x.jpg and b/x.jpg, or y.jpg
    and y.png, never write the same overlay."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    common = Path(os.path.commonpath([p.parent for p in absolute]))
    return [p.relative_to(common).with_name(f"{p.name}_pred.png") for p in absolute]


def checkpoint_detector(loaded: LoadedModel) -> Detector:
    """A `Detector` running a checkpoint's model (`checkpoint.load_model`) with evaluation's inference step."""

    @torch.no_grad()
    def detect(image: Tensor) -> dict:
        output = detect_batch(loaded.model, [image], device=loaded.device, amp=cuda_autocast(loaded.config.model.precision))[0]
        return output_to_cpu(output)

    return detect


def exported_detector(path: str | Path, *, runtime: str | None = None,
                      precision: str | None = None) -> tuple[Detector, list[str]]:
    """A `Detector` running a .onnx or .pt2 file written by `maskrcnn export`, and its class names.

    Args:
        runtime, precision: as `export.load_predictor` takes them (OpenVINO for an .onnx file, in fp32 or bf16).
    Raises:
        UserError: the file is missing or not an exported model, the runtime or precision does not apply to it, or
            the runtime's packages are not installed.
    """
    from maskrcnn.export import load_predictor

    try:
        predictor = load_predictor(path, runtime=runtime, precision=precision)
    except ImportError as error:
        extra = "openvino" if runtime == "openvino" else "export"
        raise UserError(f"{path}: running an exported model needs the optional packages of "
                        f"`pip install maskrcnn[{extra}]` ({error})") from None
    except (ValueError, FileNotFoundError) as error:  # the file is not what `maskrcnn export` writes
        raise UserError(str(error)) from None

    def detect(image: Tensor) -> dict:
        return predictor([image.float() / 255.0])[0]

    return detect, predictor.info.class_names


def coco_ids(paths: list[Path], annotations: str | Path, checkpoint: str | Path,
             categories: list[dict]) -> tuple[list[dict], dict[Path, object]]:
    """(categories, image id per path) from a COCO json that lists the images: its own category ids (its classes
    must be the checkpoint's) and the id of the image whose file_name ends the path (`000001.jpg`,
    `val2017/000001.jpg`).

    Raises:
        CheckpointError: the json's classes are not the checkpoint's. UserError: an image is not in the json.
    """
    json_categories, id_of_file = read_coco_index(annotations)
    if json_categories:
        check_categories(checkpoint, categories, annotations, json_categories)
        categories = json_categories
    image_ids = {}
    for path in paths:
        parts = path.absolute().parts
        tails = ("/".join(parts[-k:]) for k in range(1, len(parts) + 1))
        image_ids[path] = next((id_of_file[tail] for tail in tails if tail in id_of_file), None)
        if image_ids[path] is None:
            raise UserError(f"{path}: no image of {annotations} has this file name")
    return categories, image_ids


@dataclass
class Prediction:
    """What `predict_images` wrote."""

    records: list[dict]  # per image: "image_id", "file_name", and "overlay" + "detections" or "error"
    out: Path  # the folder of the overlays, predictions.json and images.json

    @property
    def skipped(self) -> int:
        """Images that could not be read."""
        return sum("error" in record for record in self.records)


def predict_images(paths: list[Path], detect: Detector, categories: list[dict], image_ids: dict[Path, object],
                   out: Path, score_thresh: float) -> Prediction:
    """Runs `detect` on every image; writes overlays, predictions.json (COCO results) and images.json (per image:
    its id, file, overlay and number of detections, or the error that made it skipped).

    An image that cannot be read is skipped, logged as a warning and recorded in images.json; the others are
    still written. When `detect` raises (or Ctrl-C), both json files still hold the images done so far.
    Results carry `categories`' ids (label k is categories[k - 1]) and each path's id from `image_ids`.
    """
    class_names = [c["name"] for c in categories]
    label_to_category_id = {label: c["id"] for label, c in enumerate(categories, start=1)}
    results, records = [], []
    try:
        for path, overlay_name in zip(paths, overlay_names(paths)):
            image_id = image_ids[path]
            try:
                image = read_rgb(path)
            except DatasetError as error:
                log.warning(f"skipped {error}")
                records.append({"image_id": image_id, "file_name": str(path), "error": str(error)})
                continue
            output = detect(image)
            keep = output["scores"] >= score_thresh
            output = {k: v[keep] for k, v in output.items()}
            overlay = draw_detections(image, output["boxes"], output["labels"], output["scores"],
                                      class_names=class_names, masks=output["masks"])
            save_png(overlay, out / overlay_name)
            for det in detections_to_coco(output, image_id, label_to_category_id):
                results.append({**det, "file_name": str(path)})
            records.append({"image_id": image_id, "file_name": str(path), "overlay": str(overlay_name),
                            "detections": int(keep.sum())})
            log.info(f"{path}: {int(keep.sum())} detections")
    finally:  # also when stopped (Ctrl-C, out of memory): the images done so far keep their results
        write_text_atomic(out / "predictions.json", json.dumps(results))
        write_text_atomic(out / "images.json", json.dumps(records, indent=1))
    return Prediction(records=records, out=out)


def calibration_images(folder: str | Path) -> list[Tensor]:
    """The images of a folder (its image files) as f32[3, H, W] in 0..1, to calibrate int8 activation ranges.

    Raises:
        UserError: not a folder, no image in it, or an image that cannot be read.
    """
    if not Path(folder).is_dir():
        raise UserError(f"--int8 {folder}: not a folder (of calibration images)")
    try:
        return [read_rgb(path).float() / 255.0 for path in image_paths([folder])]
    except DatasetError as error:
        raise UserError(f"--int8 {folder}: {error}") from None


def run_prediction(checkpoint: str | Path, inputs: list[str], out: str | Path, *, score_thresh: float,
                   annotations: str | Path | None, runtime: str | None, precision: str | None,
                   overrides: list[str]) -> str:
    """`maskrcnn predict`: the model of a checkpoint or exported file on the images and folders of `inputs`;
    overlays, predictions.json and images.json into `out`. Returns the line to print.

    Raises:
        UserError: a bad input, model file, option or output folder; none of the images could be read.
    """
    paths, out = image_paths(inputs), Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if Path(checkpoint).suffix in SUFFIXES:  # an exported model knows its class names only
        if overrides:
            raise UserError(f"{checkpoint}: --set changes a config, and an exported model has none (its settings "
                            f"are part of the graph); export again with the changed config instead")
        detect, class_names = exported_detector(checkpoint, runtime=runtime, precision=precision)
        categories = [{"id": label, "name": name} for label, name in enumerate(class_names, start=1)]
    else:
        if runtime is not None:
            raise UserError(f"--runtime applies to exported models (.onnx), not to {checkpoint}")
        overrides = overrides if precision is None else [*overrides, f"model.precision={precision}"]
        loaded = load_model(checkpoint, overrides=overrides)
        detect, categories = checkpoint_detector(loaded), loaded.categories
    image_ids = {path: number for number, path in enumerate(paths, start=1)}
    if annotations is not None:
        categories, image_ids = coco_ids(paths, annotations, checkpoint, categories)
    out.mkdir(parents=True, exist_ok=True)
    done = predict_images(paths, detect, categories, image_ids, out, score_thresh)
    if done.skipped == len(done.records):
        raise UserError(f"none of the {len(done.records)} image(s) could be read; the reasons are in "
                        f"{out / 'images.json'}")
    skipped = f"; {done.skipped} unreadable image(s) skipped, listed in images.json" if done.skipped else ""
    return f"overlays, predictions.json (COCO results with the training data's category ids) and images.json in " \
           f"{out}{skipped}"
