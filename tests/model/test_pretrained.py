"""Weights from torchvision's servers are read like every other weights file: torch.load(weights_only=True)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torchvision import models

from maskrcnn.config import ModelConfig
from maskrcnn.model import build_model
from maskrcnn.model.backbone import build_backbone
from maskrcnn.model.pretrained import WeightsError


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache (TORCH_HOME) whose downloads fail: only files put there are found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"downloaded {url} although it is in the cache")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize("setting, weights", [
    ("model.backbone.weights=imagenet", models.ResNet18_Weights.IMAGENET1K_V1),
    ("model.weights=torchvision-coco", models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
])
def test_a_crafted_file_in_the_hub_cache_is_refused_without_running(tmp_path, hub_cache, write_malicious_checkpoint,
                                                                    setting, weights):
    """The hub cache is where the offline hint tells users to put the file: whatever lies there runs no code."""
    cached = hub_cache / Path(weights.url).name
    hub_cache.mkdir(parents=True)
    marker = tmp_path / "pwned"
    write_malicious_checkpoint(cached, marker)
    with pytest.raises(WeightsError, match=f"^{setting}.*: {cached} holds objects other than tensors"):
        if setting.startswith("model.backbone"):
            build_backbone(depth=18, weights="imagenet")
        else:
            build_model(dataclasses.replace(ModelConfig(num_classes=2), weights="torchvision-coco"))
    assert not marker.exists()


def test_a_cached_file_is_loaded_and_a_download_lands_in_the_cache(tmp_path, hub_cache, monkeypatch):
    """A file found in the cache is read as it is; a missing one is downloaded there (with the hash digits of its
    name checked), then read the same way."""
    weights = models.ResNet18_Weights.IMAGENET1K_V1
    trunk = models.resnet18(weights=None).state_dict()
    hub_cache.mkdir(parents=True)
    torch.save(trunk, hub_cache / Path(weights.url).name)
    backbone = build_backbone(depth=18, norm="batch", weights="imagenet")
    assert torch.equal(backbone.body.conv1.weight, trunk["conv1.weight"])

    (hub_cache / Path(weights.url).name).unlink()
    downloads = []

    def download(url, destination, hash_prefix, progress=True):
        downloads.append((url, Path(destination), hash_prefix))
        torch.save(trunk, destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    backbone = build_backbone(depth=18, norm="batch", weights="imagenet")
    # https://download.pytorch.org/models/resnet18-f37072fd.pth: f37072fd are the first digits of its SHA-256
    assert downloads == [(weights.url, hub_cache / "resnet18-f37072fd.pth", "f37072fd")]
    assert torch.equal(backbone.body.layer4[1].conv2.weight, trunk["layer4.1.conv2.weight"])
