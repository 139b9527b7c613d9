"""Fixtures shared across the suite: the tiny CPU config (64 px synthetic images, ResNet-18 with a thin FPN and
heads) and one tiny trained run that the CLI, engine, report, predict and export tests share instead of each
training its own. Session fixtures are read, never changed: a test that changes a run works on a copy
(`copy_run`)."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from maskrcnn.config import Config, config_from_dict

TINY = {
    "model": {
        "num_classes": 2,
        "backbone": {"depth": 18, "norm": "group", "fpn_channels": 32},
        "transform": {"min_size": 64, "max_size": 64},
        "rpn": {"anchor_sizes": [8, 16, 32, 64, 128], "batch_size_per_image": 32, "pre_nms_top_n_train": 100,
                "pre_nms_top_n_test": 50, "post_nms_top_n_train": 50, "post_nms_top_n_test": 20},
        "box_head": {"representation_size": 32, "batch_size_per_image": 16, "detections_per_img": 10},
        "mask_head": {"conv_channels": 32, "num_convs": 1},
    },
    "data": {"format": "synthetic", "synthetic_train_size": 8, "synthetic_val_size": 2,
             "synthetic_image_size": [64, 64], "synthetic_num_classes": 2},
    "train": {"batch_size": 2, "max_iters": 4, "warmup_iters": 2, "lr": 0.01, "log_period": 1,
              "checkpoint_period": 2, "device": "cpu", "schedule": "cosine"},
    "eval": {"batch_size": 2, "num_vis": 1},
}


# The slowest test files (about 10-110 s each on 2 cores: they export models, train in subprocesses or start
# servers), slowest first. `make test` runs files on 2 processes (pytest-xdist --dist loadfile
# --no-loadscope-reorder), which take files in collection order: longest first, the many short files fill the gaps
# at the end (greedy longest-first scheduling) instead of a long one starting last.
SLOWEST_FILES = ("tests/export/test_export_trained.py", "tests/engine/test_train.py", "tests/test_cli.py",
                 "tests/export/test_export_seed.py", "tests/export/test_export_torchvision.py",
                 "tests/export/test_export_lite.py", "tests/app/test_serve.py", "tests/model/test_convert_v2.py",
                 "tests/model/test_convert.py", "tests/engine/test_distributed.py", "tests/test_bad_inputs.py",
                 "tests/app/test_concurrent_runs.py", "tests/model/test_maskrcnn.py", "tests/app/test_serve_page.py",
                 "tests/model/test_finetune.py")


# Penn-Fudan beside the repository (the project's machines); elsewhere set MASKRCNN_PENNFUDAN or the real-photo
# tests skip. Found here, never in the package: src/ names no path of a machine.
PENNFUDAN_BESIDE_REPO = Path(__file__).resolve().parents[2] / "shared" / "data" / "PennFudanPed"
if not os.environ.get("MASKRCNN_PENNFUDAN") and (PENNFUDAN_BESIDE_REPO / "PNGImages").is_dir():
    os.environ["MASKRCNN_PENNFUDAN"] = str(PENNFUDAN_BESIDE_REPO)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and the subprocesses its tests start) gets its share of the cores as torch
    threads: 2 workers with 2 threads each on 2 cores spent a third of the suite's CPU time waiting on each other
    (`make test` on the project's 2-core VM: pytest 290 s, 8.5 CPU-minutes; one thread per worker: 216 s, 6.1)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Moves the tests of SLOWEST_FILES to the front, in that order; the rest keep theirs."""
    def rank(item: pytest.Item) -> int:
        file = item.nodeid.split("::")[0]
        return SLOWEST_FILES.index(file) if file in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)


def make_tiny_config(out_dir, *overrides: str) -> Config:
    return config_from_dict(TINY, [f"train.out_dir={out_dir}", *overrides])


@pytest.fixture
def tiny_config():
    """tiny_config(out_dir, "key=value", ...) -> Config."""
    return make_tiny_config


@pytest.fixture(scope="session")
def tiny_values():
    """The tiny config as nested plain values (for YAML files and --set overrides). Shared: copy before changing;
    the session ends with an error if a test changed it."""
    values = copy.deepcopy(TINY)
    yield values
    assert values == TINY, "a test changed the shared tiny_values fixture"


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory) -> Path:
    """The tiny config as a YAML file (train.out_dir left to the default: give --out)."""
    path = tmp_path_factory.mktemp("tiny_config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(tiny_yaml, tmp_path_factory) -> Path:
    """One tiny run of `maskrcnn train tiny.yaml` (TINY's train.max_iters on 8 synthetic images, evaluated
    on 2, reported): the run folder, holding config.yaml, last.pt, best.pt, metrics.jsonl, log.txt, metrics.json,
    detections.json, pr_curves.json, report.md / report.html and figures/. Read it, never change it: copy it
    with `copy_run` to resume, overwrite or evaluate into it. The session ends with an error if a test changed it.
    """
    from maskrcnn.cli import main

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    assert main(["train", str(tiny_yaml), "--out", str(run)]) == 0
    before = _snapshot(run)
    yield run
    assert _snapshot(run) == before, "a test changed the shared tiny_run folder"


@pytest.fixture
def copy_run(tiny_run, tmp_path):
    """copy_run(name="run") -> a copy of `tiny_run` in this test's tmp_path, to change."""

    def copy_to(name: str = "run") -> Path:
        return Path(shutil.copytree(tiny_run, tmp_path / name))

    return copy_to


class Payload:
    """Unpickling this runs `touch <marker>`: what a crafted .pt file does to whoever loads it with pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def write_malicious_checkpoint():
    """write(path, marker): a file that looks like one of our checkpoints (a dict with "model") but whose loading
    with pickle creates `marker`."""

    def write(path, marker) -> None:
        torch.save({"model": {"w": torch.ones(2)}, "iteration": 1, "extra": Payload(marker)}, path)

    return write
