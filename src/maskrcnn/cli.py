"""The `maskrcnn` command: demo, train, evaluate, predict, export, data. The only module that reads argv; it
parses, calls the engine and prints, nothing more.

Heavy modules (torch, the model, the data sets) are imported inside the commands, so that `maskrcnn --help`
answers at once. A `UserError` (bad input, named by file / id / config key) ends a command with one line and
exit status 2; any other exception is a bug of this package and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import urllib.error
from dataclasses import replace
from pathlib import Path

from maskrcnn.config import Config, check_config, config_path, load_config, preset_names, preset_path
from maskrcnn.errors import UserError

# ---------------------------------------------------------------------------------------------- helpers


def _out_dir(cfg: Config, out: str | Path | None) -> Config:
    """`cfg` with train.out_dir set from --out, checked as the config file's value is (an existing file is refused)."""
    return cfg if out is None else check_config(replace(cfg, train=replace(cfg.train, out_dir=str(out))))


def _with_precision(overrides: list[str], precision: str | None) -> list[str]:
    """The --set overrides, with --precision as model.precision when given."""
    return overrides if precision is None else [*overrides, f"model.precision={precision}"]


def _run_training(cfg: Config, *, resume: bool, overwrite: bool, title: str) -> int:
    """Trains, evaluates, writes the report; prints where everything is. Returns the exit status: 0, or 128 + the
    signal's number when SIGINT / SIGTERM stopped the training (after saving last.pt)."""
    import signal

    from maskrcnn.engine import distributed
    from maskrcnn.app.jobs import train_and_report
    from maskrcnn.engine.run_folder import RunFolder
    from maskrcnn.viz.report import format_metric

    result, reported = train_and_report(cfg, resume=resume, overwrite=overwrite, title=title)
    run = RunFolder(result.out_dir)
    if result.interrupted_by is not None:
        if distributed.is_main():
            print(f"stopped by {result.interrupted_by} after iteration {result.iterations}; saved {run.last}. "
                  f"Continue with: maskrcnn train {run.config} --resume", file=sys.stderr)
        return 128 + signal.Signals[result.interrupted_by].value
    if not distributed.is_main():
        return 0
    voc = result.evaluation.metrics["voc"]
    print(f"trained {result.iterations} iterations" + (" (stopped by the time budget)" if result.stopped_early else "")
          + f", {reported.minutes:.1f} minutes with evaluation and report")
    print(_summary(result.evaluation.metrics))
    print(f"mask mAP@{voc['iou_thresh']:g} (original metric): {format_metric(voc['segm']['mAP'])}")
    print(f"report: {reported.report_html}\n        {reported.report_md}")
    return 0


def _summary(metrics: dict) -> str:
    """COCO AP, AP50, AP75 and the original project's mAP of boxes and masks, as a small table."""
    from maskrcnn.viz.report import format_metric

    voc = metrics["voc"]
    lines = [f"{'':6} {'AP':>6} {'AP50':>6} {'AP75':>6} {'mAP@' + format(voc['iou_thresh'], 'g'):>8}"]
    for label, kind in (("boxes", "bbox"), ("masks", "segm")):
        stats = metrics[kind]
        lines.append(f"{label:6} {format_metric(stats['AP']):>6} {format_metric(stats['AP50']):>6} "
                     f"{format_metric(stats['AP75']):>6} {format_metric(voc[kind]['mAP']):>8}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    from maskrcnn.engine.run_folder import RunFolder

    cfg = load_config(preset_path("demo"), args.set)
    if args.out is None and not args.overwrite:  # a second `maskrcnn demo` keeps the first one's run
        cfg = _out_dir(cfg, RunFolder(cfg.train.out_dir).first_free().path)
    cfg = _out_dir(cfg, args.out)
    if args.minutes is not None:
        cfg = replace(cfg, train=replace(cfg.train, max_minutes=args.minutes))
    return _run_training(cfg, resume=False, overwrite=args.overwrite, title="Mask R-CNN demo (synthetic shapes)")


def cmd_train(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    cfg = _out_dir(load_config(path, args.set), args.out)
    return _run_training(cfg, resume=args.resume, overwrite=args.overwrite, title=f"Mask R-CNN run ({path.stem})")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from maskrcnn.app.jobs import evaluate_checkpoint

    checkpoint = Path(args.checkpoint)
    out = Path(args.out or checkpoint.parent / f"eval_{checkpoint.stem}")
    reported = evaluate_checkpoint(checkpoint, out, data_config=args.data_config,
                                   overrides=_with_precision(args.set, args.precision),
                                   overwrite=args.overwrite)
    print(_summary(reported.evaluation.metrics))
    print(f"metrics: {out / 'metrics.json'}\nreport: {reported.report_html}\n        {reported.report_md}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from maskrcnn.app import predict
    from maskrcnn.engine.checkpoint import load_model
    from maskrcnn.export.exporter import SUFFIXES

    paths = predict.image_paths(args.inputs)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if Path(args.checkpoint).suffix in SUFFIXES:  # an exported model knows its class names only
        if args.set:
            raise UserError(f"{args.checkpoint}: --set changes a config, and an exported model has none (its "
                            f"settings are part of the graph); export again with the changed config instead")
        detect, class_names = predict.exported_detector(args.checkpoint, runtime=args.runtime,
                                                        precision=args.precision)
        categories = [{"id": label, "name": name} for label, name in enumerate(class_names, start=1)]
    else:
        if args.runtime is not None:
            raise UserError(f"--runtime applies to exported models (.onnx), not to {args.checkpoint}")
        loaded = load_model(args.checkpoint, overrides=_with_precision(args.set, args.precision))
        detect, categories = predict.checkpoint_detector(loaded), loaded.categories
    image_ids = {path: number for number, path in enumerate(paths, start=1)}
    if args.annotations is not None:
        categories, image_ids = predict.coco_ids(paths, args.annotations, args.checkpoint, categories)
    out.mkdir(parents=True, exist_ok=True)
    done = predict.predict_images(paths, detect, categories, image_ids, out, args.score_thresh)
    if done.skipped == len(done.records):
        raise UserError(f"none of the {len(done.records)} image(s) could be read; the reasons are in "
                        f"{out / 'images.json'}")
    print(f"overlays, predictions.json (COCO results with the training data's category ids) and images.json in {out}"
          + (f"; {done.skipped} unreadable image(s) skipped, listed in images.json" if done.skipped else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from maskrcnn.engine.checkpoint import load_model, load_torchvision_model
    from maskrcnn.app.deploy import check_export_targets, export_for_runtime
    from maskrcnn.app.predict import calibration_images
    from maskrcnn.export import contract
    from maskrcnn.export.exporter import DEFAULT_OPSET

    opset = args.opset or DEFAULT_OPSET
    outs = [Path(out) for out in args.out]
    check_export_targets(outs, int8=args.int8 is not None)
    calibration = calibration_images(args.int8) if args.int8 is not None else None
    if args.torchvision:
        model, class_names = load_torchvision_model(args.checkpoint), None
    else:
        loaded = load_model(args.checkpoint, overrides=args.set)
        model, class_names = loaded.model, [c["name"] for c in loaded.categories]
    info, convolutions = export_for_runtime(model, outs, class_names=class_names, opset=opset,
                                            calibration=calibration)
    for out in outs:
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
    print(f"run it: maskrcnn predict {outs[0]} IMAGES... --out DIR")
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


def _opset(text: str) -> int:
    """--opset: an integer >= 16, the first opset with half-pixel RoiAlign."""
    if not text.isdigit() or int(text) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 16 or later (half-pixel RoiAlign)")
    return int(text)


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
    predict.add_argument("--runtime", metavar="NAME",
                         help="runtime of an .onnx file: onnxruntime (default) or openvino (`pip install "
                              "maskrcnn[openvino]`; it also takes --precision fp32 or bf16)")
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
    export.add_argument("--out", required=True, nargs="+", metavar="FILE",
                        help="model.onnx and/or model.pt2: one export, written in each file's format")
    export.add_argument("--torchvision", action="store_true",
                        help="CHECKPOINT is a torchvision maskrcnn_resnet50_fpn state dict (converted on the way)")
    export.add_argument("--opset", type=_opset, metavar="N", help="ONNX opset, >= 16 (default: 18)")
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
    subset.add_argument("instances_json", metavar="INSTANCES_JSON",
                        help="COCO instances json, e.g. instances_val2017.json")
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
    """The `maskrcnn` logger's lines while a command runs (in a torchrun job on rank 0 only): progress on stdout,
    warnings on stderr as `maskrcnn: warning: ...`."""
    logger = logging.getLogger("maskrcnn")
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("maskrcnn: warning: %(message)s"))
    level = logger.level
    logger.addHandler(progress)
    logger.addHandler(warnings)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(progress)
        logger.removeHandler(warnings)
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
    """(the line for stderr, exit status) of an error that ended a command.

    A `UserError` (config, data, checkpoint, weights, run folder) and an `OSError` (a file or folder the system
    refused, a full disk, the network) are for the user to fix: `maskrcnn: error: <message>`, status 2. So is
    running out of memory. Anything else is a bug of this package: `maskrcnn: internal error: ...`, status 1,
    with the way to get its traceback."""
    text = _message(error)
    if _download_failure(error):
        return f"maskrcnn: error: {text} (downloading needs the internet; offline, give a local file, e.g. " \
               f"model.backbone.weights: /path/to.pth)", 2
    if isinstance(error, (UserError, OSError)):
        return f"maskrcnn: error: {text}", 2
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # torch's, without torch
        return f"maskrcnn: error: out of memory ({text}); try a smaller train.batch_size / eval.batch_size or " \
               f"model.transform.max_size", 2
    return (f"maskrcnn: internal error: {type(error).__name__}: {text} (this is a bug; run again with --debug or "
            f"MASKRCNN_DEBUG=1 for the traceback, and please report it)"), 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of `maskrcnn` and `python -m maskrcnn`; returns the exit status.

    Every error ends as one line on stderr (`describe_error`): exit status 2 for what the user can fix, 1 for a
    bug; `--debug` or MASKRCNN_DEBUG=1 lets the exception and its traceback through.
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
        print(line, file=sys.stderr)
        return status
