"""Ours against torchvision's maskrcnn_resnet50_fpn on a GPU under one protocol (issue 35): one run, one JSON.

    python benchmarks/gpu_protocol.py --device cuda --deadline-s 560      # what `device.sh run all` runs
    python benchmarks/gpu_protocol.py --device cpu --batch 2 --height 128 --width 160 --warmup 0 --iters 1 \\
        --accuracy-budget 3 --accuracy-size 128 160 --workers 0           # every path of the script, on a CPU

Weights: a seeded random-init torchvision model (2 classes, as Penn-Fudan) and ours converted from it with
`from_torchvision`, saved once and loaded by every process. No trained weights can be downloaded here, and random
ones give about 830 detections per image above the 0.05 score threshold, all pasted by torchvision one at a time;
so both models keep D = --detections per image (`detections_per_img`; default 8: a trained ours gives 7.3 per
held-out Penn-Fudan photo at 0.05, results/train_pennfudan_lite.json). Every image of every call is checked to give
D, and the JSON records it; the inference rows also record how well ours' boxes match torchvision's.
Images: the first --batch Penn-Fudan photos resized to --height x --width (800x1088: both models keep that size).

Steps, most important first; the JSON is rewritten after each case, so a run cut off keeps what it finished:
  bf16      bf16 autocast, batch 8: inference, then a training step (forward, backward, SGD step); for each,
            cudnn.benchmark off, then on (the same for both models in a row); torchvision, then ours
  accuracy  Penn-Fudan, --accuracy-budget s of training each (time_to_accuracy.py, a process per model), then
            COCO AP on the 50 held-out photos: ours, then torchvision
  fp32      as bf16, in fp32
  batch1    inference at batch 1, bf16 and fp32, cudnn.benchmark off and on
Each case (mode, model, precision, batch, cudnn.benchmark) runs in a process of its own, forked from a server that
only imported the modules (multiprocessing's forkserver): no CUDA context, allocator cache or cudnn tuning is
inherited, and no process pays for the imports again. A case runs --warmup untimed calls, then --iters timed
calls (each synchronised), stopping after --max-timed-s once 5 are done; its figure is their median.

Time on an H100, estimated from the H200 figures of RESULTS.md (commit 4413f80's model, torchvision then at 100
detections per image, so its inference rows are upper bounds), with ~2 s to start a process and ~1.5 s of cudnn
tuning with benchmark on:
  bf16      8 cases: inference 86 / 332 ms per call (ours / torchvision), training 121 / 853 ms     ~ 45 s
  accuracy  2 x (200 s of training + ~10 s to start, evaluate and score)                            ~ 420 s
  fp32      8 cases: inference 83 / 379 ms, training 402 / 326 ms                                   ~ 45 s
  batch1    8 cases: 37 / 72 ms                                                                     ~ 30 s
with the staging and this script's start (~10 s): about 550 s. --deadline-s skips a case that would start less than
15 s before it (an accuracy run: its budget + 30 s), recorded under "skipped".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops import box_iou

from compare_torchvision import HEIGHT, WIDTH, load_batch, pennfudan_root, synchronize, train_step_fn
from maskrcnn.model import from_torchvision

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("torchvision", "ours")
STEPS = ("bf16", "accuracy", "fp32", "batch1")
MIN_TIMED_CALLS = 5
CASE_RESERVE_S = 15.0  # a case starts only this long before the deadline
ACCURACY_RESERVE_S = 30.0  # an accuracy run's start, evaluation and scoring beyond its training budget
STARTED = time.monotonic()  # the deadline counts from here (the imports above: a few seconds)


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration, run in a process of its own."""

    mode: str  # "infer" (eval-mode forward, dense masks pasted into the image) or "train" (one SGD step)
    model: str  # "torchvision" or "ours"
    dtype: str  # "bf16" (autocast) or "fp32"
    batch: int  # images per call
    cudnn_benchmark: bool  # torch.backends.cudnn.benchmark in that process


@dataclasses.dataclass(frozen=True)
class Timing:
    """How each case is timed; the same for every case of a run."""

    device: str  # "cuda" or "cpu"
    warmup: int  # untimed calls first
    iters: int  # timed calls at most
    max_timed_s: float  # timing stops after this many seconds once MIN_TIMED_CALLS are done


def commit() -> str:
    """HEAD of this checkout; on the device (its copy of the tree has no .git) the one `device.sh prepare` wrote."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--",
                                  "src", "benchmarks"], capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on the device
        head = None
    if head is not None and head.returncode == 0:
        return head.stdout.strip() + (" with uncommitted changes in src/ or benchmarks/" if changed else "")
    staged = ROOT / ".device" / "commit"
    return staged.read_text().strip() + " (written by device.sh prepare)" if staged.exists() else "unknown"


def run_info() -> dict:
    """Commit, date, host and library versions of this run (no CUDA call: the device comes from the cases)."""
    return {"commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda}


def build_models(detections: int, height: int, width: int, num_classes: int = 2) -> dict[str, torch.nn.Module]:
    """The seeded random-init torchvision model keeping `detections` per image, and ours converted from it; both
    resize to min / max size = the images' sides, so that they keep height x width (800x1088: the same as
    torchvision's default 800 / 1333)."""
    torch.manual_seed(0)
    torchvision_model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                              min_size=min(height, width), max_size=max(height, width))
    torchvision_model.roi_heads.detections_per_img = detections
    ours = from_torchvision(torchvision_model)
    if ours.box_head.detections_per_img != detections:
        raise RuntimeError(f"from_torchvision kept {ours.box_head.detections_per_img} detections per image")
    return {"torchvision": torchvision_model, "ours": ours}


def steps(names: list[str], batch: int) -> list[tuple[str, list[Case] | str]]:
    """The steps in the order asked: lists of cases (both models of a row one after the other) or accuracy runs."""
    def rows(mode: str, dtype: str, batch_size: int) -> list[Case]:
        return [Case(mode, model, dtype, batch_size, benchmark) for benchmark in (False, True) for model in MODELS]

    planned: list[tuple[str, list[Case] | str]] = []
    for name in names:
        if name in ("bf16", "fp32"):
            planned.append((name, rows("infer", name, batch) + rows("train", name, batch)))
        elif name == "batch1":
            planned.append((name, rows("infer", "bf16", 1) + rows("infer", "fp32", 1)))
        else:
            planned += [(name, model) for model in reversed(MODELS)]  # ours first: never measured on a GPU yet
    return planned


def save_inputs(folder: Path, args: argparse.Namespace) -> dict[str, str]:
    """Both models and the image batch saved once, so that every case's process loads the same ones."""
    files = {}
    for name, model in build_models(args.detections, args.height, args.width).items():
        files[name] = str(folder / f"{name}.pt")
        torch.save(model, files[name])
    images, targets = load_batch(args.batch, torch.device("cpu"), args.height, args.width)
    files["batch"] = str(folder / "batch.pt")
    torch.save({"images": images, "targets": targets}, files["batch"])
    return files


def inference_call(model, images: list[torch.Tensor], autocast_dtype, device: torch.device, last: list):
    """One eval-mode call with dense masks (torchvision's output for both); `last` gets the detections per image
    and the first image's boxes f32[D, 4] (shapes and a reference: nothing waits on the GPU for them)."""
    model.eval()

    def infer() -> None:
        autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        with torch.inference_mode(), autocast:
            outputs = model(images)
        last[:] = [[len(output["boxes"]) for output in outputs], outputs[0]["boxes"]]

    return infer


def timed_calls(fn, device: torch.device, timing: Timing) -> list[float]:
    """Milliseconds of each timed call of `fn` (each synchronised), after `timing.warmup` untimed ones."""
    for _ in range(timing.warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < timing.iters and (len(times) < MIN_TIMED_CALLS
                                         or time.perf_counter() - started < timing.max_timed_s):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return times


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def measure_case(case: Case, timing: Timing, files: dict[str, str]) -> dict:
    """One case's row: median milliseconds and images/s, every timed call, the seconds the process took to be
    ready and in all, and for inference the detections of each image and the first image's boxes."""
    started = time.perf_counter()
    device = torch.device(timing.device)
    torch.backends.cudnn.benchmark = case.cudnn_benchmark
    model = torch.load(files[case.model], weights_only=False).to(device)
    batch = torch.load(files["batch"])
    images = [image.to(device) for image in batch["images"][: case.batch]]
    targets = [{key: value.to(device) for key, value in target.items()} for target in batch["targets"][: case.batch]]
    autocast_dtype = torch.bfloat16 if case.dtype == "bf16" else None
    last: list = []
    fn = (train_step_fn(model, images, targets, autocast_dtype, device) if case.mode == "train"
          else inference_call(model, images, autocast_dtype, device, last))
    ready_s = time.perf_counter() - started
    times = timed_calls(fn, device, timing)
    ms = statistics.median(times)
    row = {**dataclasses.asdict(case), "ms": ms, "img_s": 1000 * case.batch / ms, "timed_ms": times,
           "ready_s": ready_s, "seconds": time.perf_counter() - started, "device": device_name(device)}
    if device.type == "cuda":
        row.update(peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                   cudnn=torch.backends.cudnn.version())
    if last:
        row["detections_per_image"] = last[0]
        row["first_image_boxes"] = last[1].float().cpu().tolist()
    return row


def _case_process(send, case: Case, timing: Timing, files: dict[str, str]) -> None:
    try:
        row = measure_case(case, timing, files)
    except Exception as error:  # recorded in the row; the run goes on with the next case
        traceback.print_exc()
        row = {**dataclasses.asdict(case), "error": f"{type(error).__name__}: {error}"}
    send.send(row)
    send.close()


def run_case(context, case: Case, timing: Timing, files: dict[str, str]) -> dict:
    """`measure_case` in a process of its own; a process that dies (out of memory, say) gives a row with an error."""
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_case_process, args=(send, case, timing, files))
    process.start()
    send.close()
    try:
        row = receive.recv()
    except EOFError:
        row = None
    process.join()
    return row or {**dataclasses.asdict(case), "error": f"the process ended with exit code {process.exitcode}"}


def pair_rows(torchvision_row: dict, ours_row: dict) -> dict:
    """Both models' figures of one row: images/s, ours over torchvision, and for inference the detections per
    image and the worst best-IoU of a torchvision box of the first image among ours' (1: the same boxes)."""
    pair = {key: ours_row[key] for key in ("mode", "batch", "dtype", "cudnn_benchmark")}
    pair.update(torchvision_img_s=torchvision_row["img_s"], ours_img_s=ours_row["img_s"],
                ours_over_torchvision=ours_row["img_s"] / torchvision_row["img_s"])
    boxes = [row.pop("first_image_boxes", None) for row in (torchvision_row, ours_row)]
    if boxes[0] is not None and boxes[1] is not None:
        iou = box_iou(torch.tensor(boxes[0]).view(-1, 4), torch.tensor(boxes[1]).view(-1, 4))  # (D, D)
        pair["min_matched_box_iou"] = iou.max(dim=1).values.min().item() if iou.numel() else None
        pair["detections_per_image"] = {"torchvision": torchvision_row["detections_per_image"],
                                        "ours": ours_row["detections_per_image"]}
    return pair


def run_accuracy(name: str, args: argparse.Namespace, folder: Path) -> dict:
    """time_to_accuracy.py for one model in a process of its own: its result and settings, or the error."""
    output = folder / f"accuracy_{name}.json"
    command = [sys.executable, str(Path(__file__).with_name("time_to_accuracy.py")), "--device", args.device,
               "--models", name, "--budget", str(args.accuracy_budget), "--min-size", str(args.accuracy_size[0]),
               "--max-size", str(args.accuracy_size[1]), "--json", str(output)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    try:
        subprocess.run(command, check=True, timeout=args.accuracy_budget + 600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        return {"error": str(error)}
    saved = json.loads(output.read_text())
    return {**saved["results"][name], "settings": {key: value for key, value in saved.items() if key != "results"}}


def write_json(path: Path, report: dict) -> None:
    """Written whole and then renamed, so that a run killed while writing keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2))
    temporary.replace(path)


def record_row(report: dict, row: dict) -> None:
    """Adds a case's row to the report, and the pair of its row once both models are in."""
    print(json.dumps({key: value for key, value in row.items() if key != "first_image_boxes"}), flush=True)
    report["device"] = report["device"] or row.get("device")
    report["throughput"].append(row)
    key = [row[name] for name in ("mode", "batch", "dtype", "cudnn_benchmark")]
    same = {other["model"]: other for other in report["throughput"]
            if [other[name] for name in ("mode", "batch", "dtype", "cudnn_benchmark")] == key}
    if len(same) == 2 and not any("error" in other for other in same.values()):
        report["pairs"].append(pair_rows(same["torchvision"], same["ours"]))


def run_steps(planned: list, args: argparse.Namespace, files: dict[str, str], folder: Path, report: dict) -> None:
    """Runs the planned cases in order, skipping those the deadline leaves no time for; the JSON after each."""
    timing = Timing(args.device, args.warmup, args.iters, args.max_timed_s)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__"])  # torch, torchvision and the package, imported once
    for step, work in planned:
        for case in work if isinstance(work, list) else [work]:
            reserve = CASE_RESERVE_S if isinstance(case, Case) else args.accuracy_budget + ACCURACY_RESERVE_S
            if args.deadline_s is not None and time.monotonic() - STARTED + reserve > args.deadline_s:
                report["skipped"].append({"step": step, **(dataclasses.asdict(case) if isinstance(case, Case)
                                                          else {"model": case})})
            elif isinstance(case, Case):
                record_row(report, run_case(context, case, timing, files))
            else:
                report["accuracy"][case] = run_accuracy(case, args, folder)
                print(json.dumps({"accuracy": {case: report["accuracy"][case]}}), flush=True)
            report["elapsed_s"] = time.monotonic() - STARTED
            write_json(args.json, report)


def print_summary(report: dict) -> None:
    print(f"\n{report['device']}; torch {report['torch']}; commit {report['commit']}; {report['settings']}\n")
    print("| mode | batch | dtype | cudnn.benchmark | torchvision img/s | ours img/s | ours / torchvision "
          "| min box IoU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for pair in report["pairs"]:
        iou = pair.get("min_matched_box_iou")
        print(f"| {pair['mode']} | {pair['batch']} | {pair['dtype']} | {'on' if pair['cudnn_benchmark'] else 'off'} "
              f"| {pair['torchvision_img_s']:.1f} | {pair['ours_img_s']:.1f} | {pair['ours_over_torchvision']:.2f} "
              f"| {'-' if iou is None else f'{iou:.3f}'} |")
    for name, result in report["accuracy"].items():
        if "error" in result:
            print(f"\naccuracy, {name}: {result['error']}")
        else:
            print(f"\naccuracy, {name}: {result['iterations']} iterations in {result['seconds']:.0f} s, "
                  f"box AP {result['bbox']['AP']:.3f}, mask AP {result['segm']['AP']:.3f}")
    errors = [row for row in report["throughput"] if "error" in row]
    for row in errors:
        print(f"\nfailed: {row}")
    print(f"\nskipped (deadline): {len(report['skipped'])}; {report['elapsed_s']:.0f} s in all")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to run every path of the script")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="in the order given")
    parser.add_argument("--batch", type=int, default=8, help="the batch of the bf16 and fp32 steps")
    parser.add_argument("--height", type=int, default=HEIGHT)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--detections", type=int, default=8, help="D, detections per image for both models")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per case")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per case at most")
    parser.add_argument("--max-timed-s", type=float, default=2.0,
                        help=f"timed calls stop after this many seconds once {MIN_TIMED_CALLS} are done")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help=f"seconds after the start: no case begins less than {CASE_RESERVE_S:.0f} s (an accuracy "
                             f"run: its budget + {ACCURACY_RESERVE_S:.0f} s) before")
    parser.add_argument("--accuracy-budget", type=float, default=200.0, help="training seconds per model")
    parser.add_argument("--accuracy-size", type=int, nargs=2, default=[800, 1333], metavar=("MIN", "MAX"),
                        help="time_to_accuracy's resize")
    parser.add_argument("--workers", type=int, default=None, help="time_to_accuracy's loader processes")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_protocol.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    settings = {key: getattr(args, key) for key in ("steps", "batch", "height", "width", "detections", "warmup",
                                                     "iters", "max_timed_s", "deadline_s", "accuracy_budget",
                                                     "accuracy_size")}
    settings.update(min_timed_calls=MIN_TIMED_CALLS, num_classes=2, score_thresh=0.05,
                    weights="torch.manual_seed(0); maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, "
                            "num_classes=2); ours = from_torchvision(it)",
                    images=(f"the first {args.batch} Penn-Fudan photos, resized" if pennfudan_root()
                            else "synthetic shapes (Penn-Fudan not found)"))
    report = {**run_info(), "device": None, "settings": settings, "throughput": [], "pairs": [], "accuracy": {},
              "skipped": [], "elapsed_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="gpu_protocol_") as folder:
        files = save_inputs(Path(folder), args)
        run_steps(steps(args.steps, args.batch), args, files, Path(folder), report)
    print_summary(report)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
