"""The `maskrcnn` command: demo, train, evaluate, predict, export, data. The only module that reads argv; it
parses, calls a use case of `maskrcnn.app` and prints what it returns, nothing more.

Heavy modules (torch, the model, the data sets) are imported inside the commands, so that `maskrcnn --help`
answers at once. A `UserError` (bad input, named by file / id / config key) ends a command with one line and
exit status 2; any other exception is a bug of this package and says so.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.error

from maskrcnn.cli_data import add_data_parsers
from maskrcnn.cli_serve import add_serve_parser
from maskrcnn.config import preset_names
from maskrcnn.errors import UserError
from maskrcnn.logs import progress_to_terminal

# --------------------------------------------------------------------------------------------- commands


def _with_precision(overrides: list[str], precision: str | None) -> list[str]:
    """The --set overrides, with --precision as model.precision when given."""
    return overrides if precision is None else [*overrides, f"model.precision={precision}"]


def _print_training(outcome) -> int:
    """Prints a training job's outcome (`app.jobs.TrainOutcome`); returns its exit status."""
    for line in outcome.lines:
        print(line)
    for line in outcome.warnings:
        print(line, file=sys.stderr)
    return outcome.status


def cmd_demo(args: argparse.Namespace) -> int:
    from maskrcnn.app import jobs

    cfg = jobs.demo_config(args.set, out=args.out, minutes=args.minutes, overwrite=args.overwrite)
    return _print_training(jobs.run_training(cfg, resume=False, overwrite=args.overwrite,
                                             title="Mask R-CNN demo (synthetic shapes)"))


def cmd_train(args: argparse.Namespace) -> int:
    from maskrcnn.app import jobs

    cfg, name = jobs.train_config(args.config, args.set, out=args.out)
    return _print_training(jobs.run_training(cfg, resume=args.resume, overwrite=args.overwrite,
                                             title=f"Mask R-CNN run ({name})"))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from maskrcnn.app import jobs

    print("\n".join(jobs.run_evaluation(args.checkpoint, args.out, data_config=args.data_config,
                                        overrides=_with_precision(args.set, args.precision),
                                        overwrite=args.overwrite)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from maskrcnn.app import predict

    options = predict.PredictOptions(score_thresh=args.score_thresh, batch_size=args.batch_size, every=args.every,
                                     tile=args.tile, overlap=args.overlap, recursive=args.recursive,
                                     format=args.format, overlays=not args.no_overlays, save_masks=args.save_masks)
    print(predict.run_prediction(args.checkpoint, args.inputs, args.out, options=options,
                                 annotations=args.annotations, runtime=args.runtime, precision=args.precision,
                                 overrides=args.set))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from maskrcnn.app import deploy

    print("\n".join(deploy.run_export(args.checkpoint, args.out, torchvision=args.torchvision, opset=args.opset,
                                      int8=args.int8, overrides=args.set)))
    return 0


def cmd_data_coco_subset(args: argparse.Namespace) -> int:
    from maskrcnn.app import prepare_data

    print(prepare_data.coco_subset(args.instances_json, args.out_json))
    return 0


def cmd_data_pennfudan(args: argparse.Namespace) -> int:
    from maskrcnn.app import prepare_data

    print(prepare_data.pennfudan(args.dir, source=args.source))
    return 0


# ------------------------------------------------------------------------------------------------ parser

DEBUG_HELP = "show the full traceback of an error (also: environment variable MASKRCNN_DEBUG=1)"


def _opset(text: str) -> int:
    """--opset: an integer >= 16, the first opset with half-pixel RoiAlign."""
    if not text.isdigit() or int(text) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 16 or later (half-pixel RoiAlign)")
    return int(text)


def _finite(text: str) -> float:
    """A float option: a finite number (NaN and infinity would silently keep everything or nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def _score(text: str) -> float:
    """A score threshold: a number in [0, 1]."""
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a score threshold must be between 0 and 1")
    return value


def _positive(text: str) -> float:
    """A finite number above 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be above 0")
    return value


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="inference precision (model.precision): bf16 needs AVX-512 BF16 or AMX on a CPU; auto: "
                        "the faster of the two, timed on the first images (default: the checkpoint's config)")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.01 (repeatable)")
    # also accepted after the command; SUPPRESS keeps a --debug given before it
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def _add_training(sub) -> None:
    demo = sub.add_parser("demo", help="train and evaluate a small model on synthetic shapes, write a report",
                          description="Train a small Mask R-CNN on synthetic shapes on the CPU, evaluate it on "
                                      "held-out images and write report.md / report.html.")
    demo.add_argument("--out", metavar="DIR", help="run directory (default: runs/demo)")
    demo.add_argument("--minutes", type=_positive, metavar="M", help="training time budget in minutes (default: 10)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the run in the output folder (default: runs/demo, or the first runs/demo-N "
                           "that holds no earlier run)")
    _add_set(demo)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train from a YAML config",
                           description="Train from a YAML config; evaluates at the end and writes the report.")
    train.add_argument("config", metavar="CONFIG",
                       help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    _add_set(train)
    train.add_argument("--resume", action="store_true", help="continue from last.pt in the run directory")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in the run directory (its checkpoints and metrics)")
    train.add_argument("--out", metavar="DIR", help="run directory (default: the config's train.out_dir)")
    train.set_defaults(func=cmd_train)


def _add_evaluate(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint (COCO AP and per-class AP@0.5)",
                              description="Evaluate a checkpoint on the validation split of its data (or of "
                                          "--data-config) and write metrics.json and a report.")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file written by `maskrcnn train`")
    evaluate.add_argument("--data-config", metavar="CONFIG",
                          help="take the data section from this preset or YAML file instead")
    evaluate.add_argument("--out", metavar="DIR", help="output folder (default: eval_<name> next to the checkpoint)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace the metrics and report already in the output folder")
    _add_precision(evaluate)
    _add_set(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)


def _add_predict(sub) -> None:
    predict = sub.add_parser("predict", help="detect objects in images and videos, write overlays and results",
                             description="Run a checkpoint on images, folders, globs and videos; write "
                                         "<name>_pred.png overlays (<name>_pred.mp4 for a video), "
                                         "predictions.json (COCO results; video frames carry frame and "
                                         "timestamp) and images.json (one record per image or frame).")
    predict.add_argument("checkpoint", metavar="CHECKPOINT",
                         help="a .pt file written by `maskrcnn train`, or a .onnx (ONNX Runtime) or .pt2 file "
                              "written by `maskrcnn export`")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files (any type Pillow reads), folders, glob patterns ('photos/**/*.jpg'), "
                              "video files (mp4, mov, mkv, avi, ...: `pip install maskrcnn[video]`) or stream URLs")
    predict.add_argument("--out", required=True, metavar="DIR", help="output folder")
    predict.add_argument("--score-thresh", type=_score, default=0.5, metavar="S",
                         help="keep detections scoring at least S (default: 0.5)")
    predict.add_argument("--batch-size", type=int, default=4, metavar="N",
                         help="images (or tiles) per model call (default: 4)")
    predict.add_argument("--every", type=int, default=1, metavar="N", help="predict every N-th frame of a video")
    predict.add_argument("--tile", type=int, metavar="SIZE",
                         help="predict large images in overlapping SIZE x SIZE tiles (and whole), duplicates at "
                              "tile borders merged")
    predict.add_argument("--overlap", type=_finite, default=0.2, metavar="F",
                         help="with --tile: the fraction of a tile its neighbours share (default: 0.2)")
    predict.add_argument("--recursive", action="store_true", help="folders: also the files in their sub-folders")
    predict.add_argument("--format", choices=("rle", "polygons"), default="rle",
                         help="masks in predictions.json: COCO RLE (default) or polygons (`pip install "
                              "maskrcnn[polygons]`)")
    predict.add_argument("--no-overlays", action="store_true", help="write the json files only, no overlays")
    predict.add_argument("--save-masks", action="store_true",
                         help="also write a mask PNG per image (<name>_masks.png; pixel k: detection k)")
    predict.add_argument("--annotations", metavar="JSON",
                         help="COCO json listing the images: predictions.json then uses its image and category ids")
    predict.add_argument("--runtime", metavar="NAME",
                         help="runtime of an .onnx file: onnxruntime (default) or openvino (`pip install "
                              "maskrcnn[openvino]`; it also takes --precision fp32 or bf16)")
    _add_precision(predict)
    _add_set(predict)
    predict.set_defaults(func=cmd_predict)


def _add_export(sub) -> None:
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
    _add_set(export)
    export.set_defaults(func=cmd_export)


def _add_data(sub) -> None:
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
    add_data_parsers(data_sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn",
        description="Mask R-CNN instance segmentation: train, evaluate, predict, export, end to end.",
        epilog="Start with `maskrcnn demo`: synthetic data, a CPU-sized model, a report in minutes.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_training, _add_evaluate, _add_predict, _add_export, add_serve_parser, _add_data):
        add(sub)
    return parser


# ------------------------------------------------------------------------------------------------ errors

_WORKER_TRACEBACK = "Original Traceback (most recent call last):"
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


# what an allocation that failed says: torch's CPU allocator (a RuntimeError), CUDA's, numpy's
_ALLOCATION_FAILED = re.compile(r"can't allocate memory|DefaultCPUAllocator|out of memory|Unable to allocate")


def _out_of_memory(error: BaseException) -> bool:
    """Whether the error is a failed allocation: MemoryError, torch's OutOfMemoryError (named without importing
    torch) or the RuntimeError of torch's CPU allocator."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and _ALLOCATION_FAILED.search(str(error)) is not None


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
    if _out_of_memory(error):
        return f"maskrcnn: error: out of memory ({text[:200]}); use less: a smaller train.batch_size / " \
               f"eval.batch_size / --batch-size, fewer detections (model.box_head.detections_per_img), a smaller " \
               f"model.transform.max_size, or predict large images in tiles (--tile)", 2
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
        with progress_to_terminal():
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
