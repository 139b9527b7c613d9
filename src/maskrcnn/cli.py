"""The `maskrcnn` command: demo, train, evaluate, predict, data. The only module that reads argv.

Heavy modules (torch, the model, the data sets) are imported inside the commands, so that `maskrcnn --help`
answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from maskrcnn.config import Config, ConfigError, config_from_dict, load_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def preset_path(name: str) -> Path:
    """A YAML preset shipped inside the package (`configs/` in the repository links to the same folder)."""
    return Path(__file__).resolve().parent / "configs" / f"{name}.yaml"


class CommandError(Exception):
    """A user error found by the command line itself (e.g. no image in the given folders)."""


# ---------------------------------------------------------------------------------------------- helpers


def _out_dir(cfg: Config, out: str | None) -> Config:
    return cfg if out is None else replace(cfg, train=replace(cfg.train, out_dir=str(out)))


def _build_for_checkpoint(path: str, data_config: str | None, overrides: list[str]):
    """(config, model with the checkpoint's weights, device, class names) for evaluate / predict."""
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
        values = dict(values, data=config_to_dict(load_config(data_config).data))
    cfg = config_from_dict(values, overrides)
    # The weights come from the checkpoint: never load (or download) the ones the config names.
    model_cfg = replace(cfg.model, weights="none", backbone=replace(cfg.model.backbone, weights="none"))
    model = build_model(model_cfg)
    load_state_dict_checked(model, state["model"], path, hint="the model of the checkpoint's config")
    device = resolve_device(cfg.train.device)
    model.to(device).eval()
    torch.set_grad_enabled(False)
    class_names = state.get("class_names") or [f"class {k}" for k in range(1, cfg.model.num_classes + 1)]
    return cfg, model, device, class_names


def _run_training(cfg: Config, *, resume: bool, title: str) -> int:
    """Trains, evaluates, writes the report; prints where everything is. Returns the exit status: 0, or 128 + the
    signal's number when SIGINT / SIGTERM stopped the training (after saving last.pt)."""
    import signal

    from maskrcnn.engine import distributed
    from maskrcnn.engine.train import train
    from maskrcnn.fileio import full_disk_as_error
    from maskrcnn.viz.report import build_report, format_metric

    started = time.perf_counter()
    result = train(cfg, resume=resume)
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
    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CommandError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise CommandError(f"image or folder not found: {path}")
    return paths


# --------------------------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = _out_dir(load_config(preset_path("demo"), args.set), args.out)
    if args.minutes is not None:
        cfg = replace(cfg, train=replace(cfg.train, max_minutes=args.minutes))
    return _run_training(cfg, resume=False, title="Mask R-CNN demo (synthetic shapes)")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _out_dir(load_config(args.config, args.set), args.out)
    return _run_training(cfg, resume=args.resume, title=f"Mask R-CNN run ({Path(args.config).name})")


# What `evaluate` writes into its output folder: replaced only with --overwrite (the folder may be a training run's).
EVALUATION_OUTPUTS = ("metrics.json", "detections.json", "pr_curves.json", "report.md", "report.html", "figures")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from maskrcnn.data import build_dataset
    from maskrcnn.engine.evaluate import evaluate_dataset
    from maskrcnn.fileio import full_disk_as_error
    from maskrcnn.viz.report import build_report

    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.parent / f"eval_{checkpoint.stem}"
    existing = [name for name in EVALUATION_OUTPUTS if (out / name).exists()]
    if existing and not args.overwrite:
        raise CommandError(f"{out / existing[0]} exists (from a training run or an earlier evaluation); pass "
                           f"--overwrite to replace it or choose another --out")
    cfg, model, device, _ = _build_for_checkpoint(args.checkpoint, args.data_config, args.set)
    dataset = build_dataset(cfg.data, "val")
    with full_disk_as_error(out):
        result = evaluate_dataset(model, dataset, batch_size=cfg.eval.batch_size, device=device,
                                  num_workers=cfg.data.num_workers, iou_thresh=cfg.eval.iou_thresh,
                                  max_images=cfg.eval.max_images, amp=cfg.train.amp, out_dir=out, progress=True,
                                  num_vis=cfg.eval.num_vis)
        md, html = build_report(out, config=cfg, evaluation=result,
                                metrics_jsonl=checkpoint.parent / "metrics.jsonl", title=f"Evaluation of {checkpoint}")
    print(_summary(result.metrics))
    print(f"metrics: {out / 'metrics.json'}\nreport: {html}\n        {md}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from maskrcnn.engine.common import autocast, images_to_model
    from maskrcnn.engine.evaluate import detections_to_coco
    from maskrcnn.viz.draw import draw_detections, save_png

    paths = _image_paths(args.inputs)
    cfg, model, device, class_names = _build_for_checkpoint(args.checkpoint, None, args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for image_id, path in enumerate(paths, start=1):
        try:
            with Image.open(path) as pil:
                pixels = np.asarray(pil.convert("RGB"))
        except OSError as error:
            raise CommandError(f"{path}: not a readable image ({error})") from None
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) uint8
        with autocast(device, cfg.train.amp):
            output = model(images_to_model([image], device))[0]
        output = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}
        keep = output["scores"] >= args.score_thresh
        output = {k: v[keep] for k, v in output.items()}
        overlay = draw_detections(image, output["boxes"], output["labels"], output["scores"], class_names=class_names,
                                  masks=output["masks"])
        save_png(overlay, out / f"{path.stem}_pred.png")
        for det in detections_to_coco(output, image_id, {k: k for k in range(1, len(class_names) + 1)}):
            results.append({**det, "file_name": str(path)})
        print(f"{path}: {int(keep.sum())} detections")
    (out / "predictions.json").write_text(json.dumps(results))
    print(f"overlays and predictions.json (COCO results, category_id = label) in {out}")
    return 0


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=0.01 (repeatable)")

    demo = sub.add_parser("demo", help="train and evaluate a small model on synthetic shapes, write a report",
                          description="Train a small Mask R-CNN on synthetic shapes on the CPU, evaluate it on "
                                      "held-out images and write report.md / report.html.")
    demo.add_argument("--out", metavar="DIR", help="run directory (default: runs/demo)")
    demo.add_argument("--minutes", type=float, metavar="M", help="training time budget in minutes (default: 10)")
    add_set(demo)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train from a YAML config",
                           description="Train from a YAML config; evaluates at the end and writes the report.")
    train.add_argument("config", metavar="CONFIG", help="YAML config, e.g. configs/pennfudan.yaml")
    add_set(train)
    train.add_argument("--resume", action="store_true", help="continue from last.pt in the run directory")
    train.add_argument("--out", metavar="DIR", help="run directory (default: the config's train.out_dir)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint (COCO AP and per-class AP@0.5)",
                              description="Evaluate a checkpoint on the validation split of its data (or of "
                                          "--data-config) and write metrics.json and a report.")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file written by `maskrcnn train`")
    evaluate.add_argument("--data-config", metavar="CONFIG", help="take the data section from this YAML instead")
    evaluate.add_argument("--out", metavar="DIR", help="output folder (default: eval_<name> next to the checkpoint)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace the metrics and report already in the output folder")
    add_set(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="detect objects in images, write overlays and a results json",
                             description="Run a checkpoint on images; write <name>_pred.png overlays and "
                                         "predictions.json (COCO results format).")
    predict.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file written by `maskrcnn train`")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    predict.add_argument("--out", required=True, metavar="DIR", help="output folder")
    predict.add_argument("--score-thresh", type=float, default=0.5, metavar="S",
                         help="keep detections scoring at least S (default: 0.5)")
    add_set(predict)
    predict.set_defaults(func=cmd_predict)

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `maskrcnn` and `python -m maskrcnn`; returns the exit status."""
    args = build_parser().parse_args(argv)
    from maskrcnn.data.common import DatasetError
    from maskrcnn.engine.checkpoint import CheckpointError, RunLockedError
    from maskrcnn.engine.train import NonFiniteLossError
    from maskrcnn.fileio import DiskFullError

    try:
        return args.func(args)
    except (CommandError, ConfigError, CheckpointError, DatasetError, NonFiniteLossError, RunLockedError,
            DiskFullError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as error:
        print(f"maskrcnn: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("maskrcnn: interrupted", file=sys.stderr)
        return 130
