"""The `maskrcnn` command: demo, train, evaluate, predict, export, data. The only module that reads argv.

Heavy modules (torch, the model, the data sets) are imported inside the commands, so that `maskrcnn --help`
answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import re
import sys
import time
import urllib.error
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from maskrcnn.config import Config, check_config, config_from_dict, load_config, read_config_file

if TYPE_CHECKING:
    from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# files written by `maskrcnn export`, which `maskrcnn predict` runs instead of a checkpoint
EXPORTED_SUFFIXES = (".onnx", ".pt2")


PRESETS_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package; ./configs links here


def preset_path(name: str) -> Path:
    """A YAML preset shipped inside the package."""
    return PRESETS_DIR / f"{name}.yaml"


def preset_names() -> list[str]:
    """Every preset usable by name: the .yaml files of the package's configs folder."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


class CommandError(Exception):
    """A user error found by the command line itself (e.g. no image in the given folders)."""


# A detector for `predict`: uint8[3, H, W] image -> {"boxes" f32[D, 4], "labels" i64[D], "scores" f32[D],
# "masks" f32[D, 1, H, W]} on the CPU, in the image's coordinates.
Detector = Callable[["Tensor"], dict]


def config_file(text: str) -> Path:
    """A config named on the command line: an existing YAML file, else a preset's name (`seed`, `coco`, ...)."""
    path = Path(text)
    if path.is_file():
        return path
    if text in preset_names():
        return preset_path(text)
    raise CommandError(f"config not found: {text} is neither a file nor a preset ({', '.join(preset_names())})")


# ---------------------------------------------------------------------------------------------- helpers


def _out_dir(cfg: Config, out: str | None) -> Config:
    """`cfg` with train.out_dir set from --out, checked as the config file's value is (an existing file is refused)."""
    return cfg if out is None else check_config(replace(cfg, train=replace(cfg.train, out_dir=str(out))))


def _build_for_checkpoint(path: str, data_config: str | None, overrides: list[str]):
    """(config, model with the checkpoint's weights, device, categories [{"id", "name"}] of labels 1..K) for
    evaluate / predict."""
    import torch

    from maskrcnn.config import config_to_dict
    from maskrcnn.engine.checkpoint import load_checkpoint
    from maskrcnn.engine.common import resolve_device
    from maskrcnn.model import build_model
    from maskrcnn.model.pretrained import load_state_dict_checked

    state = load_checkpoint(path)
    if "config" not in state:
        raise CommandError(f"{path}: checkpoint has no config; it was not written by `maskrcnn train`")
    values = state["config"]
    if data_config is not None:
        if "data" not in read_config_file(data_config):
            raise CommandError(f"--data-config {data_config}: the file has no 'data' section to evaluate on")
        values = dict(values, data=config_to_dict(load_config(config_file(data_config)).data))
    cfg = config_from_dict(values, overrides)
    # The weights come from the checkpoint: never load (or download) the ones the config names.
    model_cfg = replace(cfg.model, weights="none", backbone=replace(cfg.model.backbone, weights="none"))
    model = build_model(model_cfg)
    load_state_dict_checked(model, state["model"], path, hint="the model of the checkpoint's config")
    device = resolve_device(cfg.train.device)
    model.to(device).eval()
    categories = state.get("categories") or [{"id": k, "name": f"class {k}"}
                                             for k in range(1, cfg.model.num_classes + 1)]
    return cfg, model, device, categories


def _with_precision(overrides: list[str], precision: str | None) -> list[str]:
    """The --set overrides, with --precision as model.precision when given."""
    return overrides if precision is None else [*overrides, f"model.precision={precision}"]


def _check_categories(checkpoint: str, categories: list[dict], data: str, data_categories: list[dict]) -> None:
    """A checkpoint's classes must be the data's (by name, in label order), or its labels would mean other things."""
    from maskrcnn.data import describe_categories

    if [c["name"] for c in categories] != [c["name"] for c in data_categories]:
        raise CommandError(f"{checkpoint} was trained on {describe_categories(categories)} but {data} has "
                           f"{describe_categories(data_categories)}")


# What a training run writes that a new run in the same folder would replace or truncate.
RUN_OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl")


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `folder / name` that exists, or None: what a run or an evaluation would replace there."""
    return next((folder / name for name in names if (folder / name).exists()), None)


def _first_free_run_folder(out_dir: Path) -> Path:
    """`out_dir`, or the first of out_dir-2, out_dir-3, ... that holds no earlier run."""
    candidates = itertools.chain([out_dir], (out_dir.with_name(f"{out_dir.name}-{n}") for n in itertools.count(2)))
    return next(folder for folder in candidates if _first_existing(folder, RUN_OUTPUTS) is None)


def _run_training(cfg: Config, *, resume: bool, overwrite: bool, title: str) -> int:
    """Trains, evaluates, writes the report; prints where everything is. Returns the exit status: 0, or 128 + the
    signal's number when SIGINT / SIGTERM stopped the training (after saving last.pt).

    A folder that holds an earlier run is trained into only with `resume` (continue it) or `overwrite` (replace
    it): a new run would truncate its metrics.jsonl and replace its checkpoints."""
    import signal

    from maskrcnn.data import build_dataset, with_num_classes
    from maskrcnn.engine import distributed
    from maskrcnn.engine.train import train
    from maskrcnn.fileio import full_disk_as_error
    from maskrcnn.viz.report import build_report, format_metric

    earlier = _first_existing(Path(cfg.train.out_dir), RUN_OUTPUTS)
    if earlier is not None and not (resume or overwrite):
        raise CommandError(f"{earlier} is from an earlier run; pass --resume to continue it, --overwrite to replace "
                           f"it, or choose another --out")
    started = time.perf_counter()
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    cfg = with_num_classes(cfg, train_set, val_set)
    result = train(cfg, train_set=train_set, val_set=val_set, resume=resume)
    if result.interrupted_by is not None:
        if distributed.is_main():
            print(f"stopped by {result.interrupted_by} after iteration {result.iterations}; saved "
                  f"{result.out_dir / 'last.pt'}. Continue with: maskrcnn train {result.out_dir / 'config.yaml'} "
                  f"--resume", file=sys.stderr)
        return 128 + signal.Signals[result.interrupted_by].value
    if not distributed.is_main():
        return 0
    with full_disk_as_error(result.out_dir):
        md, html = build_report(result.out_dir, config=cfg, evaluation=result.evaluation, title=title)
    voc = result.evaluation.metrics["voc"]
    print(f"trained {result.iterations} iterations" + (" (stopped by the time budget)" if result.stopped_early else "")
          + f", {(time.perf_counter() - started) / 60:.1f} minutes with evaluation and report")
    print(_summary(result.evaluation.metrics))
    print(f"mask mAP@{voc['iou_thresh']:g} (original metric): {format_metric(voc['segm']['mAP'])}")
    print(f"report: {html}\n        {md}")
    return 0


def _summary(metrics: dict) -> str:
    from maskrcnn.viz.report import format_metric

    voc = metrics["voc"]
    lines = [f"{'':6} {'AP':>6} {'AP50':>6} {'AP75':>6} {'mAP@' + format(voc['iou_thresh'], 'g'):>8}"]
    for label, kind in (("boxes", "bbox"), ("masks", "segm")):
        stats = metrics[kind]
        lines.append(f"{label:6} {format_metric(stats['AP']):>6} {format_metric(stats['AP50']):>6} "
                     f"{format_metric(stats['AP75']):>6} "
                     f"{format_metric(voc[kind]['mAP']):>8}")
    return "\n".join(lines)


def _image_paths(inputs: list[str]) -> list[Path]:
    """The image files named or held (directly) by the inputs, each once, in the order given (folders sorted)."""
    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            if not found:
                raise CommandError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise CommandError(f"image or folder not found: {path}")
    seen: set[str] = set()
    unique = []
    for path in paths:  # a file named twice (or named and inside a named folder) is predicted once
        if os.path.abspath(path) not in seen:
            seen.add(os.path.abspath(path))
            unique.append(path)
    return unique


def _overlay_names(paths: list[Path]) -> list[Path]:
    """Overlay file of every image, relative to the output folder: the image's path below the deepest folder that
    holds all of them, its whole name kept (a/x.jpg -> a/x.jpg_pred.png), so that a/x.jpg and b/x.jpg, or y.jpg
    and y.png, never write the same overlay."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    common = Path(os.path.commonpath([p.parent for p in absolute]))
    return [p.relative_to(common).with_name(f"{p.name}_pred.png") for p in absolute]


def _checkpoint_detector(checkpoint: str, overrides: list[str]) -> tuple[Detector, list[dict]]:
    """A `Detector` running one of our .pt checkpoints, and its categories [{"id", "name"}] of labels 1..K."""
    from maskrcnn.engine.common import autocast, images_to_model

    cfg, model, device, categories = _build_for_checkpoint(checkpoint, None, overrides)

    def detect(image: Tensor) -> dict:
        with autocast(device, cfg.train.amp):
            output = model(images_to_model([image], device))[0]
        return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}

    return detect, categories


def _predict_images(paths: list[Path], detect: Detector, categories: list[dict], image_ids: dict[Path, object],
                    out: Path, score_thresh: float) -> int:
    """Runs `detect` on every image; writes overlays, predictions.json (COCO results) and images.json (per image:
    its id, file, overlay and number of detections, or the error that made it skipped).

    An image that cannot be read is skipped and reported (stderr and images.json); the others are still written.
    When `detect` raises (or Ctrl-C), both json files still hold the images done so far.
    Results carry `categories`' ids (label k is categories[k - 1]) and each path's id from `image_ids`.
    Returns 0, or raises CommandError when no image could be read.
    """
    from maskrcnn.data.common import DatasetError, read_rgb
    from maskrcnn.engine.evaluate import detections_to_coco
    from maskrcnn.fileio import write_text_atomic
    from maskrcnn.viz.draw import draw_detections, save_png

    class_names = [c["name"] for c in categories]
    label_to_category_id = {label: c["id"] for label, c in enumerate(categories, start=1)}
    results, records = [], []
    try:
        for path, overlay_name in zip(paths, _overlay_names(paths)):
            image_id = image_ids[path]
            try:
                image = read_rgb(path)
            except DatasetError as error:
                print(f"maskrcnn: warning: skipped {error}", file=sys.stderr)
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
            print(f"{path}: {int(keep.sum())} detections")
    finally:  # also when stopped (Ctrl-C, out of memory): the images done so far keep their results
        write_text_atomic(out / "predictions.json", json.dumps(results))
        write_text_atomic(out / "images.json", json.dumps(records, indent=1))
    skipped = sum("error" in record for record in records)
    if skipped == len(records):
        raise CommandError(f"none of the {len(records)} image(s) could be read; the reasons are in {out / 'images.json'}")
    print(f"overlays, predictions.json (COCO results with the training data's category ids) and images.json in {out}"
          + (f"; {skipped} unreadable image(s) skipped, listed in images.json" if skipped else ""))
    return 0


# --------------------------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = load_config(preset_path("demo"), args.set)
    if args.out is None and not args.overwrite:  # a second `maskrcnn demo` keeps the first one's run
        cfg = _out_dir(cfg, str(_first_free_run_folder(Path(cfg.train.out_dir))))
    cfg = _out_dir(cfg, args.out)
    if args.minutes is not None:
        cfg = replace(cfg, train=replace(cfg.train, max_minutes=args.minutes))
    return _run_training(cfg, resume=False, overwrite=args.overwrite, title="Mask R-CNN demo (synthetic shapes)")


def cmd_train(args: argparse.Namespace) -> int:
    path = config_file(args.config)
    cfg = _out_dir(load_config(path, args.set), args.out)
    return _run_training(cfg, resume=args.resume, overwrite=args.overwrite, title=f"Mask R-CNN run ({path.stem})")


# What `evaluate` writes into its output folder: replaced only with --overwrite (the folder may be a training run's).
EVALUATION_OUTPUTS = ("metrics.json", "detections.json", "pr_curves.json", "report.md", "report.html", "figures")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from maskrcnn.data import build_dataset, data_source, dataset_categories
    from maskrcnn.engine.evaluate import evaluate_dataset
    from maskrcnn.fileio import full_disk_as_error
    from maskrcnn.viz.report import build_report

    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.parent / f"eval_{checkpoint.stem}"
    existing = _first_existing(out, EVALUATION_OUTPUTS)
    if existing is not None and not args.overwrite:
        raise CommandError(f"{existing} exists (from a training run or an earlier evaluation); pass "
                           f"--overwrite to replace it or choose another --out")
    cfg, model, device, categories = _build_for_checkpoint(args.checkpoint, args.data_config,
                                                           _with_precision(args.set, args.precision))
    dataset = build_dataset(cfg.data, "val")
    _check_categories(args.checkpoint, categories, data_source(cfg.data, "val"), dataset_categories(dataset))
    with full_disk_as_error(out):
        result = evaluate_dataset(model, dataset, batch_size=cfg.eval.batch_size, device=device,
                                  num_workers=cfg.data.num_workers, iou_thresh=cfg.eval.iou_thresh,
                                  max_images=cfg.eval.max_images, amp=cfg.train.amp, out_dir=out,
                                  num_vis=cfg.eval.num_vis)
        md, html = build_report(out, config=cfg, evaluation=result,
                                metrics_jsonl=checkpoint.parent / "metrics.jsonl", title=f"Evaluation of {checkpoint}")
    print(_summary(result.metrics))
    print(f"metrics: {out / 'metrics.json'}\nreport: {html}\n        {md}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    paths = _image_paths(args.inputs)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a folder")
    if Path(args.checkpoint).suffix in EXPORTED_SUFFIXES:  # an exported model knows its class names only
        if args.precision is not None:
            raise CommandError(f"--precision applies to checkpoints (.pt), not to {args.checkpoint}: an exported "
                               f"graph runs in the precision it was exported in")
        detect, class_names = _exported_detector(args.checkpoint, args.set)
        categories = [{"id": label, "name": name} for label, name in enumerate(class_names, start=1)]
    else:
        detect, categories = _checkpoint_detector(args.checkpoint, _with_precision(args.set, args.precision))
    image_ids = {path: number for number, path in enumerate(paths, start=1)}
    if args.annotations is not None:
        categories, image_ids = _coco_ids(paths, args.annotations, args.checkpoint, categories)
    out.mkdir(parents=True, exist_ok=True)
    return _predict_images(paths, detect, categories, image_ids, out, args.score_thresh)


def _coco_ids(paths: list[Path], annotations: str, checkpoint: str,
              categories: list[dict]) -> tuple[list[dict], dict[Path, object]]:
    """(categories, image id per path) from a COCO json that lists the images: its own category ids (its classes
    must be the checkpoint's) and the id of the image whose file_name ends the path (`000001.jpg`,
    `val2017/000001.jpg`)."""
    from maskrcnn.data import read_coco_index

    json_categories, id_of_file = read_coco_index(annotations)
    if json_categories:
        _check_categories(checkpoint, categories, annotations, json_categories)
        categories = json_categories
    image_ids = {}
    for path in paths:
        parts = path.absolute().parts
        tails = ("/".join(parts[-k:]) for k in range(1, len(parts) + 1))
        image_ids[path] = next((id_of_file[tail] for tail in tails if tail in id_of_file), None)
        if image_ids[path] is None:
            raise CommandError(f"{path}: no image of {annotations} has this file name")
    return categories, image_ids


def _exported_detector(path: str, overrides: list[str]) -> tuple[Detector, list[str]]:
    """A `Detector` running a .onnx or .pt2 file written by `maskrcnn export`, and its class names."""
    from maskrcnn.export import load_predictor

    if overrides:
        raise CommandError(f"{path}: --set changes a config, and an exported model has none (its settings are "
                           f"part of the graph); export again with the changed config instead")
    try:
        predictor = load_predictor(path)
    except ImportError as error:
        raise CommandError(f"{path}: running an exported model needs the optional packages of "
                           f"`pip install maskrcnn[export]` ({error})") from None

    def detect(image: Tensor) -> dict:
        return predictor([image.float() / 255.0])[0]

    return detect, predictor.info.class_names


def cmd_export(args: argparse.Namespace) -> int:
    from maskrcnn.export import contract, export_model
    from maskrcnn.export.exporter import DEFAULT_OPSET

    opset = args.opset or DEFAULT_OPSET
    out = Path(args.out)
    if out.suffix not in EXPORTED_SUFFIXES:
        raise CommandError(f"--out {out}: the file name must end in .onnx (ONNX) or .pt2 (torch.export)")
    if args.int8 is not None and out.suffix != ".onnx":
        raise CommandError(f"--out {out}: --int8 quantises ONNX models for ONNX Runtime; the file name must end in "
                           f".onnx")
    calibration = _calibration_images(args.int8) if args.int8 is not None else None
    if args.torchvision:
        model, class_names = _torchvision_model(args.checkpoint), None
    else:
        _, model, _, categories = _build_for_checkpoint(args.checkpoint, None, args.set)
        class_names = [c["name"] for c in categories]
    try:
        if calibration is None:
            info = export_model(model.cpu(), out, class_names=class_names, opset=opset)
        else:
            info, convolutions = _export_int8(model.cpu(), out, class_names, opset, calibration)
    except ImportError as error:
        raise CommandError(f"ONNX export needs the optional packages of `pip install maskrcnn[export]` "
                           f"({error})") from None
    if calibration is not None:
        kind = (f"ONNX (opset {opset}) with the backbone and FPN in static int8 ({convolutions} convolutions, "
                f"calibrated on {len(calibration)} images of {args.int8}), run it with ONNX Runtime on the CPU")
    elif out.suffix == ".onnx":
        kind = f"ONNX (opset {opset}), run it with ONNX Runtime"
    else:
        kind = "torch.export ExportedProgram, load it with torch.export.load"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {kind}")
    print(contract(info))
    print(f"classes: {', '.join(info.class_names)}")
    print(f"run it: maskrcnn predict {out} IMAGES... --out DIR")
    return 0


def _calibration_images(folder: str) -> list:
    """The images of `--int8 DIR` (the folder's image files) as f32[3, H, W] in 0..1."""
    from maskrcnn.data.common import DatasetError, read_rgb

    if not Path(folder).is_dir():
        raise CommandError(f"--int8 {folder}: not a folder (of calibration images)")
    try:
        return [read_rgb(path).float() / 255.0 for path in _image_paths([folder])]
    except DatasetError as error:
        raise CommandError(f"--int8 {folder}: {error}") from None


def _export_int8(model, out: Path, class_names: list[str] | None, opset: int, calibration: list):
    """(ExportInfo, number of int8 convolutions): `model` exported to ONNX in a temporary folder, then written to
    `out` with its backbone and FPN in static int8, calibrated on `calibration`."""
    import tempfile

    from maskrcnn.export import export_model
    from maskrcnn.export.quantize import quantize_backbone

    with tempfile.TemporaryDirectory() as work:
        fp32 = Path(work) / "fp32.onnx"
        info = export_model(model, fp32, class_names=class_names, opset=opset)
        out.parent.mkdir(parents=True, exist_ok=True)
        return info, quantize_backbone(fp32, out, calibration)


def _torchvision_model(path: str):
    """A converted torchvision `maskrcnn_resnet50_fpn` state dict file, in eval mode on the CPU."""
    import torch

    from maskrcnn.model import from_torchvision

    if not Path(path).is_file():
        raise CommandError(f"torchvision weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a corrupt or foreign file
        raise CommandError(f"{path}: not a readable state dict ({error})") from None
    if not isinstance(state, dict):
        raise CommandError(f"{path}: holds a {type(state).__name__}, not a torchvision state dict")
    return from_torchvision(state)


def cmd_data_coco_subset(args: argparse.Namespace) -> int:
    from maskrcnn.data import build_coco_subset

    summary = build_coco_subset(args.instances_json, args.out_json)
    print(json.dumps(summary, indent=2) if summary else "")
    print(f"wrote {args.out_json}")
    return 0


def cmd_data_pennfudan(args: argparse.Namespace) -> int:
    from maskrcnn.data import fetch_pennfudan

    root = fetch_pennfudan(args.dir, source=args.source)
    print(f"Penn-Fudan ready at {root}")
    return 0


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn",
        description="Mask R-CNN instance segmentation: train, evaluate, visualise and report, end to end.",
        epilog="Start with `maskrcnn demo`: synthetic data, a CPU-sized model, a report in minutes.",
    )
    debug_help = "show the full traceback of an error (also: environment variable MASKRCNN_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_precision(p: argparse.ArgumentParser) -> None:
        p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                       help="CPU inference precision (model.precision): bf16 needs AVX-512 BF16 or AMX; auto: the "
                            "faster of the two, timed on the first images (default: the checkpoint's config)")

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=0.01 (repeatable)")
        # also accepted after the command; SUPPRESS keeps a --debug given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)

    demo = sub.add_parser("demo", help="train and evaluate a small model on synthetic shapes, write a report",
                          description="Train a small Mask R-CNN on synthetic shapes on the CPU, evaluate it on "
                                      "held-out images and write report.md / report.html.")
    demo.add_argument("--out", metavar="DIR", help="run directory (default: runs/demo)")
    demo.add_argument("--minutes", type=float, metavar="M", help="training time budget in minutes (default: 10)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the run in the output folder (default: runs/demo, or the first runs/demo-N "
                           "that holds no earlier run)")
    add_set(demo)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train from a YAML config",
                           description="Train from a YAML config; evaluates at the end and writes the report.")
    train.add_argument("config", metavar="CONFIG",
                       help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    add_set(train)
    train.add_argument("--resume", action="store_true", help="continue from last.pt in the run directory")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in the run directory (its checkpoints and metrics)")
    train.add_argument("--out", metavar="DIR", help="run directory (default: the config's train.out_dir)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint (COCO AP and per-class AP@0.5)",
                              description="Evaluate a checkpoint on the validation split of its data (or of "
                                          "--data-config) and write metrics.json and a report.")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file written by `maskrcnn train`")
    evaluate.add_argument("--data-config", metavar="CONFIG",
                          help="take the data section from this preset or YAML file instead")
    evaluate.add_argument("--out", metavar="DIR", help="output folder (default: eval_<name> next to the checkpoint)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace the metrics and report already in the output folder")
    add_precision(evaluate)
    add_set(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="detect objects in images, write overlays and a results json",
                             description="Run a checkpoint on images; write <name>_pred.png overlays and "
                                         "predictions.json (COCO results format).")
    predict.add_argument("checkpoint", metavar="CHECKPOINT",
                         help="a .pt file written by `maskrcnn train`, or a .onnx (ONNX Runtime) or .pt2 file "
                              "written by `maskrcnn export`")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    predict.add_argument("--out", required=True, metavar="DIR", help="output folder")
    predict.add_argument("--score-thresh", type=float, default=0.5, metavar="S",
                         help="keep detections scoring at least S (default: 0.5)")
    predict.add_argument("--annotations", metavar="JSON",
                         help="COCO json listing the images: predictions.json then uses its image and category ids")
    add_precision(predict)
    add_set(predict)
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser("export", help="export a checkpoint to ONNX (.onnx) or torch.export (.pt2)",
                            description="Export a checkpoint as one batched graph: input images f32[B, 3, H, W] in "
                                        "0..1 (dynamic B, H, W); outputs boxes, scores, labels, box-relative masks "
                                        "padded to detections_per_img, and num_detections. `maskrcnn predict` "
                                        "runs the file (ONNX Runtime for .onnx).")
    export.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a .pt file written by `maskrcnn train` (or, with --torchvision, a torchvision "
                             "maskrcnn_resnet50_fpn state dict)")
    export.add_argument("--out", required=True, metavar="FILE", help="model.onnx or model.pt2")
    export.add_argument("--torchvision", action="store_true",
                        help="CHECKPOINT is a torchvision maskrcnn_resnet50_fpn state dict (converted on the way)")
    export.add_argument("--opset", type=int, metavar="N", help="ONNX opset, >= 16 (default: 18)")
    export.add_argument("--int8", metavar="DIR",
                        help="ONNX only: the backbone and FPN in static int8 (about 0.7x the fp32 graph time on a "
                             "CPU with VNNI), their activation ranges calibrated on the images of DIR (a few dozen "
                             "of the kind the model will see); the heads, NMS and RoiAlign stay fp32")
    add_set(export)
    export.set_defaults(func=cmd_export)

    data = sub.add_parser("data", help="prepare data sets", description="Prepare data sets.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    subset = data_sub.add_parser("coco-subset", help="write the 3-class COCO subset (vehicles, people, animals)",
                                 description="Write a COCO instances json restricted to the original project's "
                                             "3 classes: vehicles, people, animals.")
    subset.add_argument("instances_json", metavar="INSTANCES_JSON", help="COCO instances json, e.g. instances_val2017.json")
    subset.add_argument("out_json", metavar="OUT_JSON", help="where to write the subset json")
    subset.set_defaults(func=cmd_data_coco_subset)
    penn = data_sub.add_parser("pennfudan", help="fetch and unpack the Penn-Fudan pedestrian data set",
                               description="Put the Penn-Fudan data set into DIR, from a local zip or folder or "
                                           "(without --source) from its official address.")
    penn.add_argument("dir", metavar="DIR", help="destination folder")
    penn.add_argument("--source", metavar="ZIP_OR_DIR", help="local PennFudanPed.zip or unpacked folder")
    penn.set_defaults(func=cmd_data_pennfudan)
    return parser


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


@contextlib.contextmanager
def _progress_to_terminal():
    """The `maskrcnn` logger's progress lines (training, evaluation, report) on stdout while a command runs; in a
    torchrun job on rank 0 only."""
    logger = logging.getLogger("maskrcnn")
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _message(error: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker comes back re-raised with the
    worker's whole traceback as its message; only the original message (its last exception line) is kept."""
    text = str(error)
    if _WORKER_TRACEBACK in text:
        traceback_text = text.split(_WORKER_TRACEBACK, 1)[1]
        # the exception line is the last one starting at column 0 with "module.Name: " or "Name: "
        starts = [m.end() for m in re.finditer(r"^[A-Za-z_][\w.]*: ", traceback_text, flags=re.MULTILINE)]
        text = traceback_text[starts[-1]:] if starts else traceback_text
    return " ".join(line.strip() for line in text.strip().splitlines())


def _download_failure(error: BaseException) -> bool:
    """Whether the error was caused (anywhere in its chain) by a failed network access."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (urllib.error.URLError, ConnectionError, TimeoutError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def describe_error(error: Exception) -> tuple[str, int]:
    """(one line for stderr, exit status) of an error that ended a command: 2 for what the user can fix (bad input,
    files, config, weights, resources), 1 for a bug of this package (its line asks for the traceback)."""
    text = _message(error)
    if _download_failure(error):
        return f"{text} (downloading needs the internet; offline, give a local file, e.g. " \
               f"model.backbone.weights: /path/to.pth)", 2
    if isinstance(error, (CommandError, OSError, ValueError, RuntimeError)):
        return text, 2
    return (f"internal error {type(error).__name__}: {text} (run again with --debug or MASKRCNN_DEBUG=1 for the "
            f"traceback, and please report it)"), 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of `maskrcnn` and `python -m maskrcnn`; returns the exit status.

    Every error ends as one line `maskrcnn: error: ...` naming the file / id / config key, with exit status 2
    (1 for an internal error); `--debug` or MASKRCNN_DEBUG=1 lets the exception and its traceback through.
    """
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MASKRCNN_DEBUG", "") not in ("", "0")
    try:
        with _progress_to_terminal():
            return args.func(args)
    except KeyboardInterrupt:
        print("maskrcnn: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        line, status = describe_error(error)
        print(f"maskrcnn: error: {line}", file=sys.stderr)
        return status
