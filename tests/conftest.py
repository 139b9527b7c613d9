"""A tiny CPU config shared by the engine, viz and CLI tests: 64 px synthetic images, ResNet-18 with thin FPN and heads."""

from __future__ import annotations

import copy
import os

import pytest

import torch

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


def make_tiny_config(out_dir, *overrides: str) -> Config:
    return config_from_dict(TINY, [f"train.out_dir={out_dir}", *overrides])


@pytest.fixture
def tiny_config():
    """tiny_config(out_dir, "key=value", ...) -> Config."""
    return make_tiny_config


@pytest.fixture(scope="session")
def tiny_values() -> dict:
    """The tiny config as nested plain values (for YAML files and --set overrides)."""
    return copy.deepcopy(TINY)


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
