"""Which training augmentation pays on the `pennfudan-lite` preset: one training run per row, all at the same fixed
iteration count (the machine is shared, so a time budget would give each row a different number of steps), then
box and mask AP on the 50 held-out photos.

    python benchmarks/augment_ablation.py --root /path/to/PennFudanPed --iters 200 --out runs/augment-ablation

Each row is `maskrcnn train pennfudan-lite --set data.root=ROOT --set train.max_minutes=null --set
train.max_iters=N` plus the row's overrides, run one after the other under `nice -n 10` in fresh processes; `uptime`
is recorded before and after each. A row whose run folder already holds a finished evaluation at N iterations is read,
not retrained, so rows can be added to a table one at a time. Writes benchmarks/results/augment_ablation.json and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "none (the preset before this change)": [],
    "+ large-scale jitter 0.1-2.0, 448x448 canvas": ["data.large_scale_jitter=true", "data.jitter_canvas=[448,448]"],
    "+ copy-paste (p 0.5)": ["data.copy_paste_prob=0.5"],
    "+ colour jitter 0.4": ["data.colour_jitter=0.4"],
}


def final_evaluation(run: Path, iters: int) -> dict | None:
    """The last evaluation record of a run folder's metrics.jsonl when it was taken at `iters`, else None."""
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evaluations = [r for r in records if "eval" in r]
    return evaluations[-1] if evaluations and evaluations[-1]["iteration"] == iters else None


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


def run_row(name: str, overrides: list[str], *, run: Path, root: str, iters: int) -> dict:
    """Trains (unless `run` already holds the finished row) and returns the row's record."""
    settings = [f"data.root={root}", "train.max_minutes=null", f"train.max_iters={iters}", *overrides]
    command = ["nice", "-n", "10", sys.executable, "-m", "maskrcnn", "train", "pennfudan-lite", "--out", str(run)]
    for setting in settings:
        command += ["--set", setting]
    record = {"row": name, "overrides": overrides, "command": " ".join(command[3:]).replace(sys.executable, "python")}
    if final_evaluation(run, iters) is None:
        print("$", " ".join(command), flush=True)
        record["uptime_before"] = uptime()
        started = time.perf_counter()
        subprocess.run([*command, "--overwrite"], check=True)
        record["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
        record["uptime_after"] = uptime()
    evaluation = final_evaluation(run, iters)
    record.update(iterations=iters, bbox_ap=evaluation["eval"]["bbox"]["AP"], segm_ap=evaluation["eval"]["segm"]["AP"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the PennFudanPed folder")
    parser.add_argument("--iters", type=int, default=200, help="training iterations of every row")
    parser.add_argument("--out", type=Path, default=Path("runs/augment-ablation"), help="run folders, one per row")
    parser.add_argument("--rows", nargs="+", type=int,
                        help="row numbers to run (0-based, --extra's is last; default all)")
    parser.add_argument("--extra", nargs="+", metavar="KEY=VALUE",
                        help="one more row with these overrides (e.g. the combination of the rows that helped)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "augment_ablation.json")
    args = parser.parse_args()

    rows = list(ROWS.items())
    if args.extra:
        rows.append(("+ " + ", ".join(args.extra), args.extra))
    chosen = args.rows if args.rows is not None else range(len(rows))
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    for number in chosen:
        name, overrides = rows[number]
        run = args.out / (f"row{number}" if number < len(ROWS) else "extra")
        results[name] = run_row(name, overrides, run=run, root=args.root, iters=args.iters)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"| row ({args.iters} iterations) | box AP | mask AP |\n|---|---|---|")
    for record in results.values():
        print(f"| {record['row']} | {record['bbox_ap']:.3f} | {record['segm_ap']:.3f} |")


if __name__ == "__main__":
    main()
