"""Two trainings into one run folder, in two processes: of the two, exactly one runs; the other is refused with one
line, and the finished run's files are left as they were (no --overwrite)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

# The first training, held after it has checked the (still empty) folder and before it takes the folder's lock,
# as a slow start (a large json to parse) would hold it, until the test creates the file `go`.
HELD_TRAINING = """
import sys, time
from pathlib import Path
import maskrcnn.app.jobs as jobs
real = jobs.build_dataset
def held(*args, **kwargs):
    deadline = time.monotonic() + 120
    while not Path(sys.argv[1]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(*args, **kwargs)
jobs.build_dataset = held
from maskrcnn.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml")}


def test_a_training_that_reaches_the_lock_after_another_run_finished_is_refused(tmp_path, tiny_yaml):
    run, go = tmp_path / "run", tmp_path / "go"
    command = ["train", str(tiny_yaml), "--out", str(run)]
    first = subprocess.Popen([sys.executable, "-c", HELD_TRAINING, str(go), *command], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # started 1 s apart
    second = subprocess.run([sys.executable, "-m", "maskrcnn", *command], capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    finished = _digests(run)
    go.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 2, err
    assert err.strip().count("\n") == 0, err
    assert err.startswith(f"maskrcnn: error: {run / 'last.pt'} is from an earlier run; pass --resume"), err
    assert _digests(run) == finished
