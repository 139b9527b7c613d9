"""`maskrcnn predict`: a checkpoint or exported model over images, folders, globs and videos, into a folder of
overlays (a PNG per image, an .mp4 per video), predictions.json (COCO results, per frame for videos) and
images.json (a record per image or frame: its id, file, frame index and time, overlay and number of detections, or
the error that made it skipped), optionally mask PNGs.

The work runs as `pipeline.predict_stream`: reading, the model (in batches, or tiles) and encoding / drawing /
writing beside each other. A stopped run (Ctrl-C, an error) still writes both json files, atomically, with the
images and frames done, and finishes the overlay videos up to them.

Shape letters: D detections of one image, H/W the image's size.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from maskrcnn.app import video
from maskrcnn.app.detectors import CheckpointDetector, ExportedDetector
from maskrcnn.app.pipeline import BatchPredictor, predict_stream
from maskrcnn.app.results import FORMATS, Result, require_opencv
from maskrcnn.app.sources import (
    UNTILED_MAX_PIXELS,
    Frame,
    Input,
    collect_inputs,
    image_suffixes,
    read_frames,
    read_image,
)
from maskrcnn.app.tiles import Tiling
from maskrcnn.data import read_coco_index
from maskrcnn.data.common import DatasetError
from maskrcnn.engine.checkpoint import check_categories, load_model
from maskrcnn.errors import UserError
from maskrcnn.export.exporter import SUFFIXES
from maskrcnn.fileio import write_text_atomic
from maskrcnn.viz.draw import rle_pixels, save_png

log = logging.getLogger(__name__)

# zlib level of overlay PNGs: 1 takes 16 ms for a Penn-Fudan photo where the default 6 takes 46 ms (a tenth of the
# model's time on 2 cores), for files 2 % larger (418 -> 428 kB)
OVERLAY_PNG_LEVEL = 1


def load_detector(model: str | Path, *, runtime: str | None = None, precision: str | None = None,
                  overrides: list[str] = ()) -> CheckpointDetector | ExportedDetector:
    """The model step of a checkpoint (.pt, with `overrides` of its config) or an exported .onnx / .pt2 file.

    Raises:
        UserError: a bad model file, or an option that does not apply to it.
    """
    if Path(model).suffix in SUFFIXES:  # an exported model knows its class names only
        if overrides:
            raise UserError(f"{model}: --set changes a config, and an exported model has none (its settings "
                            f"are part of the graph); export again with the changed config instead")
        return ExportedDetector(model, runtime=runtime, precision=precision)
    if runtime is not None:
        raise UserError(f"--runtime applies to exported models (.onnx), not to {model}")
    overrides = list(overrides) if precision is None else [*overrides, f"model.precision={precision}"]
    return CheckpointDetector(load_model(model, overrides=overrides))


def output_names(inputs: list[Input]) -> dict[str, Path]:
    """Overlay file of every input, relative to the output folder: the file's path below the deepest folder that
    holds all of them, its whole name kept (a/x.jpg -> a/x.jpg_pred.png, clip.mp4 -> clip.mp4_pred.mp4), so that
    a/x.jpg and b/x.jpg, or y.jpg and y.png, never write the same overlay; the k-th stream URL or camera:
    stream<k>_pred.mp4."""
    files = [Path(os.path.abspath(item.path)) for item in inputs if not video.is_live(item.path)]
    common = Path(os.path.commonpath([p.parent for p in files])) if files else Path("/")
    names, streams = {}, 0
    for item in inputs:
        if video.is_live(item.path):
            streams += 1
            names[item.path] = Path(f"stream{streams}_pred.mp4")
        else:
            relative = Path(os.path.abspath(item.path)).relative_to(common)
            names[item.path] = relative.with_name(f"{relative.name}_pred.{'mp4' if item.kind == 'video' else 'png'}")
    return names


def coco_ids(inputs: list[Input], annotations: str | Path, checkpoint: str | Path,
             categories: list[dict]) -> tuple[list[dict], dict[str, object]]:
    """(categories, image id per input path) from a COCO json that lists the images: its own category ids (its
    classes must be the checkpoint's) and the id of the image whose file_name ends the path (`000001.jpg`,
    `val2017/000001.jpg`).

    Raises:
        CheckpointError: the json's classes are not the checkpoint's. UserError: an image is not in the json, or
            an input is a video.
    """
    json_categories, id_of_file = read_coco_index(annotations)
    if json_categories:
        check_categories(checkpoint, categories, annotations, json_categories)
        categories = json_categories
    image_ids = {}
    for item in inputs:
        if item.kind == "video":
            raise UserError(f"--annotations {annotations}: names images, and {item.path} is a video")
        parts = Path(item.path).absolute().parts
        tails = ("/".join(parts[-k:]) for k in range(1, len(parts) + 1))
        image_ids[item.path] = next((id_of_file[tail] for tail in tails if tail in id_of_file), None)
        if image_ids[item.path] is None:
            raise UserError(f"{item.path}: no image of {annotations} has this file name")
    return categories, image_ids


def mask_png(result: Result) -> Image.Image:
    """One image of the detections' masks: pixel value k where detection k (1-based, in predictions.json's order)
    covers it, the higher score winning overlaps; 0 elsewhere. 8-bit, 16-bit beyond 255 detections."""
    ids = np.zeros(result.image_size, dtype=np.uint8 if len(result) <= 255 else np.uint16)
    for k in range(len(result), 0, -1):  # lowest score first, so the best is painted last
        ids[rle_pixels(result.rles[k - 1])] = k
    return Image.fromarray(ids)


@dataclass
class Written:
    """What a pool thread made of one frame, for the writer to append in order."""

    record: dict
    detections: list[dict]
    overlay: torch.Tensor | None = None  # a video frame's overlay, to be written in order


@dataclass
class PredictionWriter:
    """The outputs of a prediction in its folder: `post` (pool threads) draws and saves one frame's files, `take`
    (the caller, in order) appends its records and video frames, `close` writes the json files."""

    out: Path
    categories: list[dict]
    names: dict[str, Path]  # overlay of every input (`output_names`)
    image_ids: dict[str, object] | None = None  # from --annotations; None: the frame numbers
    format: str = "rle"
    overlays: bool = True
    save_masks: bool = False
    rates: dict[str, Fraction] = field(default_factory=dict)  # overlay frame rate of every video
    results: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    videos: dict[str, video.VideoWriter] = field(default_factory=dict)

    def post(self, frame: Frame, result: Result | None) -> Written:
        image_id = self.image_ids[frame.source] if self.image_ids is not None else frame.number
        record: dict = {"image_id": image_id, "file_name": frame.source}
        where = {} if frame.frame is None else {"frame": frame.frame, "timestamp": frame.timestamp}
        record.update(where)
        if result is None:
            return Written({**record, "error": frame.error}, [])
        name = self.names[frame.source]
        label_to_id = {label: c["id"] for label, c in enumerate(self.categories, start=1)}
        detections = [{**det, "file_name": frame.source, **where}
                      for det in result.to_coco(image_id, label_to_id, format=self.format)]
        if self.save_masks:
            masks = name.with_name(name.name.replace("_pred.", "_masks.", 1)).with_suffix(".png")
            if frame.frame is not None:
                masks = masks.with_suffix("") / f"{frame.frame:06d}.png"
            (self.out / masks).parent.mkdir(parents=True, exist_ok=True)
            mask_png(result).save(self.out / masks)
            record["masks"] = str(masks)
        overlay = result.plot(frame.image) if self.overlays else None
        if overlay is not None and frame.frame is None:
            save_png(overlay, self.out / name, compress_level=OVERLAY_PNG_LEVEL)
        if self.overlays:
            record["overlay"] = str(name)
        return Written({**record, "detections": len(result)}, detections, overlay if frame.frame is not None else None)

    def take(self, written: Written) -> None:
        self.results += written.detections
        self.records.append(written.record)
        if written.overlay is not None:
            source = written.record["file_name"]
            if source not in self.videos:
                self.videos[source] = video.VideoWriter(self.out / self.names[source], self.rates[source])
            self.videos[source].write(written.overlay)

    def close(self) -> None:
        for writer in self.videos.values():
            writer.close()
        write_text_atomic(self.out / "predictions.json", json.dumps(self.results))
        write_text_atomic(self.out / "images.json", json.dumps(self.records, indent=1))


def _frame_total(inputs: list[Input], every: int) -> int | None:
    """Frames the run will predict, for the progress bar's ETA (None when a video does not say)."""
    total = 0
    for item in inputs:
        if item.kind == "image":
            total += 1
            continue
        count = video.frame_count(item.path)
        if count is None:
            return None
        total += -(-count // every)
    return total


def predict_to_folder(inputs: list[Input], predictor: BatchPredictor, writer: PredictionWriter, *,
                      every: int = 1, progress: bool = True) -> list[dict]:
    """Runs the pipeline over the inputs into `writer`'s folder; returns the records (images.json). The json files
    are written also when it stops early (Ctrl-C, an error): the images and frames done keep their results."""
    for item in inputs:
        if item.kind == "video" and writer.overlays:
            try:
                writer.rates[item.path] = video.frame_rate(item.path) / every
            except video.VideoError:  # reading it records the error
                continue
    frames = read_frames(inputs, every=every, tiled=predictor.tiling is not None)
    bar = tqdm(total=_frame_total(inputs, every), unit="img", desc="predict", disable=not progress or None,
               dynamic_ncols=True)
    try:
        for written in predict_stream(frames, predictor, writer.post):
            writer.take(written)
            bar.update()
    finally:
        bar.close()
        writer.close()
    return writer.records


def calibration_images(folder: str | Path) -> list[torch.Tensor]:
    """The image files of a folder (its videos and other files ignored) as f32[3, H, W] in 0..1, to calibrate int8
    activation ranges.

    Raises:
        UserError: not a folder, no image file in it, or an image that cannot be read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--int8 {folder}: not a folder (of calibration images)")
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in image_suffixes() and path.is_file())
    if not paths:
        raise UserError(f"--int8 {folder}: no image files")
    try:
        return [read_image(str(path), max_pixels=UNTILED_MAX_PIXELS).float() / 255.0 for path in paths]
    except DatasetError as error:
        raise UserError(f"--int8 {folder}: {error}") from None


@dataclass
class PredictOptions:
    """How `run_prediction` predicts and what it writes (the flags of `maskrcnn predict`)."""

    score_thresh: float = 0.5  # keep detections scoring at least this
    batch_size: int = 4  # images (or tiles) per model call
    every: int = 1  # predict every N-th frame of a video
    tile: int | None = None  # tile side in pixels; None: whole images
    overlap: float = 0.2  # fraction of a tile its neighbours share
    recursive: bool = False  # folders: every file below them, not only their own
    format: str = "rle"  # "segmentation" of predictions.json: "rle" or "polygons"
    overlays: bool = True  # draw overlays (PNG per image, .mp4 per video)
    save_masks: bool = False  # also write a mask PNG per image / frame (`mask_png`)
    progress: bool = True  # a progress bar on a terminal


def _check_options(options: PredictOptions) -> Tiling | None:
    if not 0 <= options.score_thresh <= 1:  # NaN too: it would silently keep nothing
        raise UserError(f"--score-thresh {options.score_thresh}: must be a number between 0 and 1")
    for name, value in (("--batch-size", options.batch_size), ("--every", options.every)):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if options.format not in FORMATS:
        raise UserError(f"--format {options.format}: must be one of {', '.join(FORMATS)}")
    if options.format == "polygons":
        require_opencv()
    try:
        return None if options.tile is None else Tiling(options.tile, options.overlap)
    except ValueError as error:
        raise UserError(str(error)) from None


def run_prediction(checkpoint: str | Path, inputs: list[str], out: str | Path, *, options: PredictOptions,
                   annotations: str | Path | None = None, runtime: str | None = None, precision: str | None = None,
                   overrides: list[str] = ()) -> str:
    """`maskrcnn predict`: the model of a checkpoint or exported file on the images, folders, globs and videos of
    `inputs`; overlays, predictions.json and images.json into `out`. Returns the line to print.

    Raises:
        UserError: a bad input, model file, option or output folder; none of the inputs could be read.
    """
    tiling = _check_options(options)
    found, out = collect_inputs(inputs, recursive=options.recursive), Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    detector = load_detector(checkpoint, runtime=runtime, precision=precision, overrides=overrides)
    categories, image_ids = detector.categories, None
    if annotations is not None:
        categories, image_ids = coco_ids(found, annotations, checkpoint, categories)
    out.mkdir(parents=True, exist_ok=True)
    writer = PredictionWriter(out, categories, output_names(found), image_ids, format=options.format,
                              overlays=options.overlays, save_masks=options.save_masks)
    predictor = BatchPredictor(detector, score_thresh=options.score_thresh, batch_size=options.batch_size,
                               tiling=tiling)
    records = predict_to_folder(found, predictor, writer, every=options.every, progress=options.progress)
    failed = [record for record in records if "error" in record]
    if len(failed) == len(records):
        first = f": {failed[0]['error']}" if failed else ""
        raise UserError(f"none of the {len(records)} image(s) could be read{first}; the reasons are in "
                        f"{out / 'images.json'}")
    skipped = f"; {len(failed)} unreadable image(s) or video(s) skipped, listed in images.json" if failed else ""
    return f"{'overlays, ' if options.overlays else ''}predictions.json (COCO results with the training data's " \
           f"category ids) and images.json in {out}{skipped}"
