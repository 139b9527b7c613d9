"""`maskrcnn predict` over a folder against the model's own batched inference rate, same images, same run.

The model rate: the decoded images in memory, batches of --batch-size through the model step alone
(`MaskRCNN.detect`: boxes, scores and box-relative masks, no paste), after one warm-up batch. The predict rate: the
same image files through `predict`'s whole pipeline (decode, the model in the same batches, RLE encoding, overlays
drawn and saved as PNG, the json files), the model loaded beforehand. Both are measured in alternating rounds
(model, predict, model, predict, ...: a shared machine's load changes by the minute), each round's ratio taken
against the mean of the model passes just before and after it; the median ratio is reported (target >= 0.9).
--posts names the pipeline's schedules to measure, each in every round: "auto" (what `maskrcnn predict` does),
"between" (encoding and drawing between model calls) and "beside" (beside them); see `app.pipeline`.
Commit, date, machine and `uptime` (before and after) go into the json.

    python benchmarks/predict_throughput.py                          # Penn-Fudan photos, pennfudan-lite sized model
    python benchmarks/predict_throughput.py --checkpoint run/best.pt --images 32
    python benchmarks/predict_throughput.py --posts auto beside                    # both schedules, same rounds
    python benchmarks/predict_throughput.py --set model.box_head.detections_per_img=100 \
        --set model.box_head.score_thresh=0 --score-thresh 0         # 100 detections an image to encode and draw

Without --checkpoint the model is the --config preset with seeded random weights (backbone weights none): the
speed of a model does not depend on what it learned, only the number of detections does (set it as above).
Images: ../shared/data/PennFudanPed/PNGImages (or $MASKRCNN_PENNFUDAN), else generated 480 x 640 images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maskrcnn.app.detectors import CheckpointDetector
from maskrcnn.app.pipeline import BatchPredictor
from maskrcnn.app.predict import PredictionWriter, output_names, predict_to_folder
from maskrcnn.app.sources import collect_inputs
from maskrcnn.config import config_to_dict, load_config
from maskrcnn.data.common import read_rgb
from maskrcnn.engine.checkpoint import load_model
from maskrcnn.model import build_model
from maskrcnn.model.precision import PrecisionChoice

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from rle_speed import machine

# model.precision auto times fp32 and bf16 on its first calls (each: SKIP_CALLS untimed, PROBE_CALLS timed): the
# measured passes start once it has chosen
WARM_UP_BATCHES = 2 * (PrecisionChoice.SKIP_CALLS + PrecisionChoice.PROBE_CALLS)
POSTS = {"auto": None, "between": True, "beside": False}  # --posts: BatchPredictor's posts_between_calls
RESULTS = Path(__file__).resolve().parent / "results" / "predict_throughput.json"


def pennfudan_images() -> Path | None:
    root = Path(os.environ.get("MASKRCNN_PENNFUDAN",
                               Path(__file__).resolve().parents[1] / "../shared/data/PennFudanPed"))
    return root / "PNGImages" if (root / "PNGImages").is_dir() else None


def image_files(count: int, folder: Path) -> list[Path]:
    """`count` Penn-Fudan photos, or generated noise images of 480 x 640 written into `folder`."""
    source = pennfudan_images()
    if source is not None:
        return sorted(source.glob("*.png"))[:count]
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        paths.append(folder / f"generated{index:03d}.png")
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def random_checkpoint(preset: str, path: Path) -> Path:
    """A checkpoint of `preset`'s model with seeded random weights (no weights read or downloaded)."""
    torch.manual_seed(0)
    config = load_config(preset, ["model.weights=none", "model.backbone.weights=none"])
    torch.save({"config": config_to_dict(config), "model": build_model(config.model).state_dict()}, path)
    return path


def model_rate(detector: CheckpointDetector, images: list[torch.Tensor], batch_size: int) -> float:
    """Images per second of the model step alone on decoded images, in batches."""
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        detector(images[start:start + batch_size])
    return len(images) / (time.perf_counter() - started)


def predict_rate(detector: CheckpointDetector, paths: list[Path], out: Path, *, batch_size: int, score_thresh: float,
                 overlays: bool, posts: str) -> tuple[float, int]:
    """Images per second of predict's pipeline over the files, and the detections it wrote."""
    inputs = collect_inputs(paths)
    writer = PredictionWriter(out, detector.categories, output_names(inputs), overlays=overlays)
    predictor = BatchPredictor(detector, score_thresh=score_thresh, batch_size=batch_size,
                               posts_between_calls=POSTS[posts])
    started = time.perf_counter()
    predict_to_folder(inputs, predictor, writer, progress=False)
    seconds = time.perf_counter() - started
    return len(paths) / seconds, len(json.loads((out / "predictions.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a trained checkpoint (default: --config with random weights)")
    parser.add_argument("--config", default="pennfudan-lite", help="preset of the random-weight model")
    parser.add_argument("--images", type=int, default=16, help="images in the folder")
    parser.add_argument("--rounds", type=int, default=3, help="predict passes, each between two model passes")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--no-overlays", action="store_true", help="predict writes the json files only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--posts", nargs="+", choices=sorted(POSTS), default=["auto"],
                        help="pipeline schedules to measure, each in every round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    before = machine()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args.config, tmp / "model.pt")
        detector = CheckpointDetector(load_model(checkpoint, overrides=args.set))
        paths = image_files(args.images, tmp)
        images = [read_rgb(path) for path in paths]
        for _ in range(WARM_UP_BATCHES):
            detector(images[:args.batch_size])
        model, predict, detections = [model_rate(detector, images, args.batch_size)], {p: [] for p in args.posts}, 0
        for round_index in range(args.rounds):
            for posts in args.posts:
                rate, detections = predict_rate(detector, paths, tmp / f"pred{round_index}{posts}",
                                                batch_size=args.batch_size, score_thresh=args.score_thresh,
                                                overlays=not args.no_overlays, posts=posts)
                predict[posts].append(rate)
            model.append(model_rate(detector, images, args.batch_size))
    ratios = {posts: [rate / statistics.mean(model[k:k + 2]) for k, rate in enumerate(rates)]
              for posts, rates in predict.items()}
    result = {
        "benchmark": "predict_throughput", **before, "uptime_after": machine()["uptime"],
        "model_images_per_s": statistics.median(model),
        "predict_images_per_s": {posts: statistics.median(rates) for posts, rates in predict.items()},
        "ratio": {posts: statistics.median(r) for posts, r in ratios.items()},
        "posts_between_calls_auto": BatchPredictor(detector).posts_between_calls,
        "rounds": {"model": model, "predict": predict, "ratios": ratios},
        "images": len(paths), "source": "Penn-Fudan PNGImages" if pennfudan_images() else "generated 480x640",
        "detections_written": detections, "batch_size": args.batch_size, "overlays": not args.no_overlays,
        "score_thresh": args.score_thresh, "checkpoint": args.checkpoint or f"{args.config} (random weights)",
        "overrides": args.set, "torch_threads": torch.get_num_threads(), "device": str(detector.device),
        "precision": detector.model.precision.chosen,
    }
    for posts in args.posts:
        print(f"{posts}: ratios per round {', '.join(f'{r:.3f}' for r in ratios[posts])}; predict (decode, model, "
              f"RLE, {'overlays, ' if result['overlays'] else ''}json) {result['predict_images_per_s'][posts]:.2f} "
              f"images/s; median ratio {result['ratio'][posts]:.3f} (target >= 0.9)")
    print(f"model alone: {result['model_images_per_s']:.2f} images/s; {len(paths)} images, batch {args.batch_size}, "
          f"{detections} detections; posts between calls under auto: {result['posts_between_calls_auto']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
