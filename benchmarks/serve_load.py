"""Load test of `maskrcnn serve` on loopback: throughput and p50 / p99 latency at concurrency 1, 4, 8 and 16 against
the model's own batched rate measured in the same run, errors counted, and the server's resident memory before and
after --requests (1,000) requests at concurrency 8.

The model: the demo preset (ResNet-18 + thin FPN, 128 px images) with seeded random weights (nothing can be
downloaded here), fp32, in a checkpoint written by this script; random weights fill every one of its 20 detection
slots with a mask, so every answer carries 20 RLE masks (a trained model's photo has a few): the encoding work per
request is the most the model can give. The images: 128 x 128 PNGs, crops of Penn-Fudan photos when present, else
noise with shapes. Every request asks score_thresh=0 (all 20 detections).

The model's batched rate: `ServedModel.detect` (the server's own model step) on batches of --max-batch decoded images,
on a thread of this process while the server is idle, measured beside every chunk of the concurrency-8 phase (the
machine is shared: its load changes by the minute); the server's share is the median over the chunks of its
images/s over the model's rate measured beside it, and likewise by CPU time (model CPU ms per image over the server
process's). Targets (issue 34): at concurrency 8, >= 90 % of the model's
batched rate, no errors, resident memory growing by < 5 % over the 1,000 requests (after a warm-up of 64).

Bounded: every phase stops after its request count or --phase-seconds, whichever comes first; the server and the
client talk over 127.0.0.1 only.

    python benchmarks/serve_load.py [--requests 1000] [--max-batch 4] [--out benchmarks/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maskrcnn.app.serve_model import load_served_model
from maskrcnn.config import config_to_dict, load_config
from maskrcnn.data.common import image_to_rgb
from maskrcnn.model.build import build_model

ROOT = Path(__file__).resolve().parents[1]
PENNFUDAN = Path(os.environ.get("MASKRCNN_PENNFUDAN", ROOT.parent / "shared/data/PennFudanPed"))
SIDE = 128  # the demo preset's image size
CONCURRENCY = (1, 4, 8, 16)


def write_checkpoint(path: Path) -> Path:
    """The demo preset's model with seeded random weights, fp32, as a checkpoint `maskrcnn serve` loads."""
    cfg = load_config("demo", ["model.precision=fp32"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    categories = [{"id": k, "name": name} for k, name in enumerate(("circle", "square", "triangle"), start=1)]
    torch.save({"config": config_to_dict(cfg), "model": model.state_dict(), "categories": categories}, path)
    return path


def images(count: int) -> list[bytes]:
    """`count` PNGs of SIDE x SIDE: centre crops of Penn-Fudan photos when present, else noise with a square."""
    files = sorted((PENNFUDAN / "PNGImages").glob("*.png"))[:count] if PENNFUDAN.is_dir() else []
    arrays = []
    for file in files:
        photo = Image.open(file).convert("RGB")
        scale = SIDE / min(photo.size)
        photo = photo.resize((max(SIDE, round(photo.width * scale)), max(SIDE, round(photo.height * scale))))
        left, top = (photo.width - SIDE) // 2, (photo.height - SIDE) // 2
        arrays.append(np.asarray(photo.crop((left, top, left + SIDE, top + SIDE))))
    rng = np.random.default_rng(0)
    while len(arrays) < count:
        pixels = rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
        pixels[30:70, 40:90] = rng.integers(0, 255, 3)
        arrays.append(pixels)
    out = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, port: int, max_batch: int, max_wait_ms: float, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "maskrcnn", "serve", str(checkpoint), "--port", str(port), "--precision", "fp32",
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", "64"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"the server did not get ready: {log.read_text()}")


def load(port: int, bodies: list[bytes], concurrency: int, count: int, seconds: float) -> dict:
    """`count` POST /predict requests from `concurrency` client threads (keep-alive connections), stopping early
    after `seconds`: throughput, latency percentiles, errors."""
    lock, sent, latencies, errors = threading.Lock(), [0], [], []
    deadline = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if sent[0] >= count or time.monotonic() > deadline:
                    return
                index = sent[0]
                sent[0] += 1
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict?score_thresh=0", bodies[index % len(bodies)],
                                   {"Content-Type": "image/png"})
                response = connection.getresponse()
                body = response.read()
                ok = response.status == 200 and b'"detections"' in body
            except OSError as error:
                ok, body = False, str(error).encode()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                (latencies if ok else errors).append(time.perf_counter() - started if ok else body[:200].decode())

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ms = sorted(1000 * value for value in latencies)
    return {"concurrency": concurrency, "requests": len(ms) + len(errors), "errors": len(errors),
            "first_errors": errors[:3], "seconds": round(elapsed, 2), "images_per_s": round(len(ms) / elapsed, 2),
            **percentiles(ms), "latencies": latencies}


def percentiles(ms: list[float]) -> dict:
    """p50 and p99 of sorted latencies in milliseconds."""
    if not ms:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": round(statistics.median(ms), 1), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1)}


def model_rate(model, decoded: list[torch.Tensor], batch: int, seconds: float) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of the model step alone on batches of `batch` images, over about
    `seconds` (after one call), on a thread of its own as the server runs it (on the project's loaded 2-core
    machine the main thread ran the same calls 4-5x slower, its two OpenMP threads spinning); the CPU time is this
    process's, all its threads."""
    out = []
    thread = threading.Thread(target=lambda: out.append(_model_rate(model, decoded, batch, seconds)))
    thread.start()
    thread.join()
    return out[0]


def _model_rate(model, decoded: list[torch.Tensor], batch: int, seconds: float) -> tuple[float, float]:
    batches = [decoded[i:i + batch] for i in range(0, len(decoded) - batch + 1, batch)]
    model.detect(batches[0])
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        model.detect(batches[done // batch % len(batches)])
        done += batch
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def server_counters(port: int) -> dict:
    """Model calls, images and model seconds so far, from the server's /metrics."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    values = {}
    for line in connection.getresponse().read().decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("maskrcnn_batch_size_count", "maskrcnn_batch_size_sum", "maskrcnn_model_seconds_sum"):
            values[name.removeprefix("maskrcnn_")] = float(value)
    return values


def paired_phase(model, decoded, server: subprocess.Popen, port: int, bodies: list[bytes],
                 args) -> tuple[dict, list[dict]]:
    """`args.requests` requests at concurrency 8 in chunks of `args.chunk`, the model's own batched rate measured
    (server idle) before the first and after every chunk: the machine is shared, its load changes within minutes,
    so each chunk is compared with the model's rate measured right beside it. Also by CPU time, which the other
    processes of a shared machine disturb less: the model's CPU seconds per image against the server process's."""
    rates, chunks, results = [model_rate(model, decoded, args.max_batch, args.model_seconds)], [], []
    deadline = time.monotonic() + args.phase_seconds
    while sum(r["requests"] for r in results) < args.requests and time.monotonic() < deadline:
        before, cpu_before = server_counters(port), cpu_seconds(server.pid)
        results.append(load(port, bodies, 8, min(args.chunk, args.requests - sum(r["requests"] for r in results)),
                            deadline - time.monotonic()))
        after, server_cpu = server_counters(port), cpu_seconds(server.pid) - cpu_before
        rates.append(model_rate(model, decoded, args.max_batch, args.model_seconds))
        model_rate_beside = (rates[-2][0] + rates[-1][0]) / 2
        model_cpu_beside = (rates[-2][1] + rates[-1][1]) / 2
        server_cpu_per_image = server_cpu / max(1, results[-1]["requests"] - results[-1]["errors"])
        busy = (after["model_seconds_sum"] - before["model_seconds_sum"]) / results[-1]["seconds"]
        calls = after["batch_size_count"] - before["batch_size_count"]
        chunks.append({"server_images_per_s": results[-1]["images_per_s"],
                       "model_images_per_s_beside": round(model_rate_beside, 2),
                       "share": round(results[-1]["images_per_s"] / model_rate_beside, 3),
                       "model_cpu_ms_per_image": round(1000 * model_cpu_beside, 1),
                       "server_cpu_ms_per_image": round(1000 * server_cpu_per_image, 1),
                       "cpu_share": round(model_cpu_beside / server_cpu_per_image, 3),
                       "model_busy_fraction": round(busy, 3),
                       "mean_batch": round((after["batch_size_sum"] - before["batch_size_sum"]) / max(calls, 1), 2),
                       "load_average_1min": round(os.getloadavg()[0], 2)})
    ms = sorted(1000 * v for r in results for v in r.pop("latencies"))
    total = {"concurrency": 8, "requests": sum(r["requests"] for r in results),
             "errors": sum(r["errors"] for r in results),
             "first_errors": [e for r in results for e in r["first_errors"]][:3],
             "seconds": round(sum(r["seconds"] for r in results), 2)}
    total.update(images_per_s=round(len(ms) / total["seconds"], 2), **percentiles(ms))
    return total, chunks


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    return {"commit": commit.strip(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests of the concurrency-8 memory phase")
    parser.add_argument("--chunk", type=int, default=100, help="requests between two measurements of the model")
    parser.add_argument("--model-seconds", type=float, default=5.0, help="length of one measurement of the model")
    parser.add_argument("--sweep-requests", type=int, default=120, help="requests of each other concurrency")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--phase-seconds", type=float, default=300.0, help="time cap of each phase")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_load.json")
    args = parser.parse_args()
    report = {**machine(), "settings": {**vars(args), "out": str(args.out), "model": "demo preset, random weights, "
              "fp32, 20 detections per image", "image": f"{SIDE} x {SIDE} PNG", "torch_threads": torch.get_num_threads()}}
    bodies = images(32)
    decoded = [image_to_rgb(Image.open(io.BytesIO(body))) for body in bodies]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_checkpoint(Path(folder) / "demo_random.pt")
        model = load_served_model(checkpoint, precision="fp32")
        model.warm_up(args.max_batch)
        port = free_port()
        server = start_server(checkpoint, port, args.max_batch, args.max_wait_ms, Path(folder) / "serve.log")
        try:
            load(port, bodies, 8, 64, args.phase_seconds)  # warm-up
            rss_before = rss_mib(server.pid)
            phases = {8: paired_phase(model, decoded, server, port, bodies, args)}
            rss_after = rss_mib(server.pid)
            for concurrency in (1, 4, 16):
                phases[concurrency] = load(port, bodies, concurrency, args.sweep_requests, args.phase_seconds)
                phases[concurrency].pop("latencies")
        finally:
            server.terminate()
            report["server_exit_status"] = server.wait(timeout=120)
    phases[8], chunks = phases[8]
    share = statistics.median(chunk["share"] for chunk in chunks)
    cpu_share = statistics.median(chunk["cpu_share"] for chunk in chunks)
    report.update({
        "phases": [phases[c] for c in CONCURRENCY],
        "concurrency_8_chunks": chunks,
        "share_of_model_rate_at_8_median": round(share, 3),
        "cpu_share_at_8_median": round(cpu_share, 3),
        "rss_mib": {"before": round(rss_before, 1), "after": round(rss_after, 1),
                    "growth": round(rss_after / rss_before - 1, 4)},
        "load_average_at_end": os.getloadavg(),
    })
    report["targets_met"] = {"share_at_8_>=_0.9": share >= 0.9, "cpu_share_at_8_>=_0.9": cpu_share >= 0.9,
                             "no_errors_at_8": phases[8]["errors"] == 0,
                             "rss_growth_<_5%": report["rss_mib"]["growth"] < 0.05}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
