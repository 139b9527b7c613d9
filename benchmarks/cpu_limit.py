"""How close each CPU inference path and training step comes to the machine's matrix-multiply limit (issue 22).

In one process and one run: the model's FLOPs (`torch.utils.flop_counter`: convolutions and matrix products,
2 FLOPs per multiply-add), the measured fp32 and bf16 GEMM rates (2048 x 2048 matmul, timed in the same rounds
as the paths), and for each path its median time, its GFLOP/s and that rate as a fraction of the GEMM rate of its
precision:

    inference, batch 1, 800 x 1088:  torchvision fp32, torchvision under torch.autocast bf16, ours fp32, ours bf16
        (model.precision), ONNX Runtime fp32 on our export (and its static int8 file when present), OpenVINO
        fp32 and bf16 on the same ONNX file when the `openvino` package is installed
    training step, batch 2:          torchvision fp32, ours fp32, ours bf16 (train.precision)

The weights are a seeded random torchvision model with the class logits scaled up, so that, as with trained
weights, 100 detections per image reach the mask head and the paste (benchmarks/export_onnxruntime.py); ours gets
the same weights through `from_torchvision`. Every time includes the mask paste into the image.
The machine is shared: the paths alternate inside each round (a load change slows all of them alike), each
figure is the median over the rounds, and `uptime` is recorded before and after.
The PyTorch inference paths are timed first, before any ONNX Runtime session exists in the process: once one
has run, torchvision fp32 took 3.5-4.2 s per call instead of 3.2-3.4 s (2026-12-04, cause not found; not the
threads' affinity), which flattered every ratio to it. The runtimes then get rounds of their own, with torchvision
fp32 again as their reference.

    python benchmarks/cpu_limit.py                              # writes benchmarks/results/cpu_limit.json; then
                                                                # paste the table into RESULTS.md
    python benchmarks/cpu_limit.py --repeats 2 --skip-train     # inference only
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_torchvision import load_batch  # noqa: E402  (the benchmarks folder is not a package)
from export_onnxruntime import images, torchvision_model  # noqa: E402

from maskrcnn.export import OnnxPredictor, OpenVinoPredictor, export_model  # noqa: E402
from maskrcnn.model import from_torchvision  # noqa: E402
from maskrcnn.model.precision import cpu_has_bf16  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"  # one JSON file per benchmark

GEMM_SIZE = 2048


GEMM_CALLS = 8  # matmuls per timed GEMM call: about a second in fp32, as long as the shortest path


def gemm_paths() -> dict[str, Callable[[], object]]:
    """GEMM_CALLS square GEMM_SIZE matmuls in fp32 and in bf16 on torch's threads: timed in the same rounds as the
    model paths, so that the rate a path is compared with was measured under the same load."""
    paths = {}
    for name, dtype in (("gemm fp32", torch.float32), ("gemm bf16", torch.bfloat16)):
        a, b = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype), torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
        paths[name] = lambda a=a, b=b: [a @ b for _ in range(GEMM_CALLS)]
    return paths


def gemm_rates(times: dict[str, list[float]]) -> dict[str, float]:
    """GFLOP/s of fp32 and bf16 GEMM from the median times of the `gemm_paths` calls."""
    flops = 2 * GEMM_SIZE**3 * GEMM_CALLS
    return {precision: flops / statistics.median(times[f"gemm {precision}"]) / 1e9 for precision in ("fp32", "bf16")}


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of `fn` (convolutions and matrix products, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def run_alternating(paths: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Each path once untimed, then `repeats` rounds that time every path once, in turn. Returns the seconds per
    call and the untimed call's result of each path."""
    outputs = {}
    for name, fn in paths.items():
        print(f"warm-up: {name}", flush=True)
        outputs[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for round_index in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        print(f"round {round_index}: " + ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items()), flush=True)
    return times, outputs


def openvino_paths(onnx_path: Path, threads: int, image: list[torch.Tensor]) -> dict[str, Callable]:
    """OpenVINO on the ONNX file (`maskrcnn predict --runtime openvino`), fp32 and, on a CPU with bf16 units, its
    bf16 inference hint; {} when the package is missing."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return {}
    precisions = {"openvino fp32": "fp32"} | ({"openvino bf16 hint": "bf16"} if cpu_has_bf16() else {})
    predictors = {name: OpenVinoPredictor(onnx_path, precision=precision, threads=threads)
                  for name, precision in precisions.items()}
    return {name: (lambda predictor=predictor: predictor(image)) for name, predictor in predictors.items()}


def inference(args: argparse.Namespace) -> dict:
    tv = torchvision_model()
    ours_fp32 = from_torchvision(tv)
    ours_bf16 = from_torchvision(tv, precision="bf16")
    image = images(1)

    def tv_call(bf16: bool) -> Callable[[], object]:
        def call():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return tv(image)
        return call

    def ours_call(model) -> Callable[[], object]:
        def call():
            with torch.inference_mode():
                return model(image)
        return call

    torch_paths = {"torchvision fp32": tv_call(False), "torchvision autocast bf16": tv_call(True),
                   "ours fp32": ours_call(ours_fp32), "ours bf16": ours_call(ours_bf16)}
    times, outputs = run_alternating(gemm_paths() | torch_paths, args.repeats)
    # counted after the rounds: a first call of ours also runs the speed layer's measured choices (both layouts)
    flops = {"torchvision": count_flops(torch_paths["torchvision fp32"]), "ours": count_flops(torch_paths["ours fp32"])}

    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        print(f"exporting {onnx_path}", flush=True)
        export_model(from_torchvision(torchvision_model()), onnx_path)
    predictor = OnnxPredictor(onnx_path, threads=args.threads, optimization="all")
    runtime_paths = {"torchvision fp32": torch_paths["torchvision fp32"],
                     "onnxruntime fp32": lambda: predictor(image)}
    static = onnx_path.with_name(onnx_path.stem + "_int8_static.onnx")
    if static.is_file():  # written by benchmarks/export_onnxruntime.py --int8-static
        static_predictor = OnnxPredictor(static, threads=args.threads, optimization="all")
        runtime_paths["onnxruntime int8 static"] = lambda: static_predictor(image)
    notes = {}
    try:
        runtime_paths |= openvino_paths(onnx_path, args.threads, image)
    except Exception as error:  # OpenVINO's own exception types: an op it cannot read or compile
        notes["openvino"] = " ".join(str(error).split())[:300]
        print(f"openvino: {notes['openvino']}", flush=True)
    runtime_times, runtime_outputs = run_alternating(gemm_paths() | runtime_paths, args.repeats)
    detections = {name: len(output[0]["boxes"]) for name, output in (outputs | runtime_outputs).items()
                  if not name.startswith("gemm")}
    return {"torch": {"flops": flops, "times": times}, "runtimes": {"flops": flops, "times": runtime_times},
            "detections": detections, "notes": notes}


def training(args: argparse.Namespace) -> dict:
    """Training steps at batch 2 (Penn-Fudan photos resized to 800 x 1088, or synthetic shapes), SGD."""
    images_2, targets_2 = load_batch(2, torch.device("cpu"))
    tv = torchvision_model().train()
    ours = from_torchvision(tv).train()

    def step(model, bf16: bool) -> Callable[[], None]:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                losses = model(images_2, targets_2)
            total = sum(value.float() for key, value in losses.items() if key.startswith("loss"))
            if not torch.isfinite(total):
                raise RuntimeError(f"non-finite training loss {float(total)}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        return call

    paths = {"torchvision fp32": step(tv, False), "ours fp32": step(ours, False), "ours bf16": step(ours, True)}
    times = run_alternating(gemm_paths() | paths, args.repeats)[0]
    # counted after the rounds: ours' first steps also run the speed layer's measured choices (both layouts)
    flops = {"torchvision": count_flops(paths["torchvision fp32"]), "ours": count_flops(paths["ours fp32"])}
    return {"flops": flops, "times": times}


def table(section: dict, reference: str) -> tuple[dict[str, float], list[dict]]:
    """The section's GEMM rates, and rows {path, seconds, GFLOP/s, fraction of the GEMM rate of the path's
    precision, ratio to `reference`}."""
    gemm = gemm_rates(section["times"])
    rows = []
    for name, times in section["times"].items():
        if name.startswith("gemm"):
            continue
        seconds = statistics.median(times)
        flops = section["flops"]["torchvision" if name.startswith("torchvision") else "ours"]
        precision = "bf16" if "bf16" in name else "fp32"
        rate = flops / seconds / 1e9
        rows.append({"path": name, "seconds": seconds, "gflops": flops / 1e9, "gflop_per_s": rate,
                     "gemm_fraction": rate / gemm[precision] if "int8" not in name else None,
                     f"vs {reference}": seconds / statistics.median(section["times"][reference]),
                     "runs": times})
    return gemm, rows


def print_table(title: str, gemm: dict[str, float], rows: list[dict], reference: str) -> None:
    print(f"\n{title}; GEMM {GEMM_SIZE}x{GEMM_SIZE} in the same rounds: fp32 {gemm['fp32']:.0f} GFLOP/s, bf16 "
          f"{gemm['bf16']:.0f} GFLOP/s\n\n| path | median s | GFLOP | GFLOP/s | of the GEMM rate | vs {reference} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        fraction = "-" if row["gemm_fraction"] is None else f"{row['gemm_fraction']:.0%}"
        print(f"| {row['path']} | {row['seconds']:.2f} | {row['gflops']:.1f} | {row['gflop_per_s']:.0f} | {fraction} "
              f"| {row[f'vs {reference}']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch, ONNX Runtime and OpenVINO threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each path once per round)")
    parser.add_argument("--onnx", default="/tmp/maskrcnn_bench/model.onnx",
                        help="our export of the benchmark weights (exported when missing)")
    parser.add_argument("--skip-train", action="store_true", help="inference only")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_limit.json",
                        help="the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip(),
               "cpu": torch.cpu.get_capabilities().get("cpu_name"), "cpu_has_bf16": cpu_has_bf16(),
               "threads": args.threads, "torch": torch.__version__}
    infer = inference(args)
    for key, section in (("inference", "torch"), ("inference_runtimes", "runtimes")):
        gemm, rows = table(infer[section], "torchvision fp32")
        results[key] = {"gemm_gflop_per_s": gemm, "rows": rows}
    results["inference"] |= {"detections": infer["detections"], "notes": infer["notes"]}
    if not args.skip_train:
        gemm, rows = table(training(args), "torchvision fp32")
        results["training"] = {"gemm_gflop_per_s": gemm, "rows": rows}
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    results["uptime"] = uptime
    print(f"\n{results['cpu']}, {args.threads} threads, torch {torch.__version__}, commit {results['commit']}, "
          f"{results['date']}; median of {args.repeats} alternating rounds\nuptime: {uptime[0]}\n        {uptime[1]}")
    for key, title in (("inference", "Inference, batch 1, 800 x 1088 (with the mask paste)"),
                       ("inference_runtimes", "Inference in the ONNX runtimes, rounds of their own"),
                       ("training", "Training step, batch 2, 800 x 1088, SGD")):
        if key in results:
            print_table(title, results[key]["gemm_gflop_per_s"], results[key]["rows"], "torchvision fp32")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
