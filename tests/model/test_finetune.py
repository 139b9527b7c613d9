"""Fine-tuning: `model.weights` of another class count (our checkpoints, torchvision's COCO v2), the class layers
re-initialised and named in the log; layers that do not fit named in one line; whole-model weights replacing the
backbone's without fetching them; the `finetune` preset offline; and a 3-class run fine-tuned to 1 class in one
`maskrcnn train`."""

import dataclasses
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, maskrcnn_resnet50_fpn_v2
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.cli import main
from maskrcnn.config import load_config
from maskrcnn.engine.train import train
from maskrcnn.model import build_model
from maskrcnn.model.pretrained import WeightsError

CLASS_LAYERS = "box_head.cls_score, box_head.bbox_pred, mask_head.logits re-initialised"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache (TORCH_HOME) and no network: every torch.hub download raises. Returns the cache's
    checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _checkpoint(tmp_path, tiny_config, *overrides):
    """A checkpoint in training's layout ({"model", "iteration"}) of a tiny model; returns (path, state dict)."""
    model = build_model(tiny_config(tmp_path, *overrides).model)
    path = tmp_path / "source.pt"
    torch.save({"model": model.state_dict(), "iteration": 4}, path)
    return path, model.state_dict()


def test_a_checkpoint_of_3_classes_starts_a_1_class_model(tmp_path, tiny_config, caplog):
    path, source = _checkpoint(tmp_path, tiny_config, "model.num_classes=3")
    cfg = tiny_config(tmp_path, f"model.weights={path}", "model.num_classes=1").model
    with caplog.at_level("INFO", logger="maskrcnn"):
        model = build_model(cfg)
    assert f"model.weights {path}: 3 classes, the model 1: class-dependent layers {CLASS_LAYERS}" in caplog.text
    state = model.state_dict()
    assert state["box_head.cls_score.weight"].shape[0] == 2 and state["mask_head.logits.weight"].shape[0] == 2
    assert state["box_head.bbox_pred.weight"].shape[0] == 8
    for key, value in source.items():
        if not key.startswith(("box_head.cls_score.", "box_head.bbox_pred.", "mask_head.logits.")):
            assert torch.equal(state[key], value), key

    caplog.clear()  # the same class count loads every layer, silently
    with caplog.at_level("INFO", logger="maskrcnn"):
        same = build_model(dataclasses.replace(cfg, num_classes=3))
    assert "re-initialised" not in caplog.text
    assert torch.equal(same.box_head.cls_score.weight, source["box_head.cls_score.weight"])


def test_a_layer_that_does_not_fit_is_one_line_naming_the_key_and_both_shapes(tmp_path, tiny_config):
    path, _ = _checkpoint(tmp_path, tiny_config)  # FPN of 32 channels
    cfg = tiny_config(tmp_path, f"model.weights={path}", "model.backbone.fpn_channels=64").model
    with pytest.raises(WeightsError) as error:
        build_model(cfg)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: weights do not fit this MaskRCNN")
    assert "backbone.fpn.inner_blocks.0.0.weight has shape [32, 64, 1, 1] in the weights, [64, 64, 1, 1] in the " \
           "model (and" in message


def test_whole_model_weights_replace_the_backbones_without_fetching_them(tmp_path, tiny_config, offline, caplog):
    path, source = _checkpoint(tmp_path, tiny_config, "model.backbone.norm=batch")
    cfg = tiny_config(tmp_path, "model.backbone.norm=batch", "model.backbone.weights=imagenet",
                      "model.backbone.trainable_layers=2", f"model.weights={path}").model
    with caplog.at_level("INFO", logger="maskrcnn"):
        model = build_model(cfg)  # the ImageNet ResNet-18 is neither in the cache nor downloadable
    assert "model.backbone.weights=imagenet not loaded: model.weights replaces the whole model" in caplog.text
    assert torch.equal(model.backbone.body.conv1.weight, source["backbone.body.conv1.weight"])
    # the layout those backbone weights give: frozen statistics, stages below trainable_layers frozen
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.layer2[0].conv1.weight.requires_grad and body.layer3[0].conv1.weight.requires_grad


@pytest.fixture(scope="module")
def torchvision_v2_state():
    """A random torchvision v2's state dict (3 classes with background): a stand-in for the COCO v2 file."""
    torch.manual_seed(0)
    return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3).state_dict()


def test_the_finetune_preset_builds_offline_from_a_local_v2_file(tmp_path, offline, torchvision_v2_state, caplog):
    offline.mkdir(parents=True)
    cached = offline / Path(MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url).name  # where torch.hub caches it
    torch.save(torchvision_v2_state, cached)
    local = tmp_path / "v2.pth"
    local.symlink_to(cached)
    for weights in ("torchvision-coco-v2", str(local)):
        caplog.clear()
        cfg = load_config("finetune", ["model.num_classes=1", f"model.weights={weights}"])
        with caplog.at_level("INFO", logger="maskrcnn"):
            model = build_model(cfg.model)
        assert f"2 classes, the model 1: class-dependent layers {CLASS_LAYERS}" in caplog.text, weights
        state = model.state_dict()
        assert torch.equal(state["box_head.convs.3.weight"], torchvision_v2_state["roi_heads.box_head.3.0.weight"])
        assert torch.equal(state["box_head.norms.0.running_var"],
                           torchvision_v2_state["roi_heads.box_head.0.1.running_var"])
        assert torch.equal(state["box_head.fc6.weight"], torchvision_v2_state["roi_heads.box_head.5.weight"])
        assert torch.equal(state["mask_head.norms.2.weight"], torchvision_v2_state["roi_heads.mask_head.2.1.weight"])
        assert torch.equal(state["rpn.head.conv.1.0.weight"], torchvision_v2_state["rpn.head.conv.1.0.weight"])
    # trainable_layers 3: frozen statistics in the ResNet, stem and layer1 frozen; the FPN's BatchNorm trains
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    assert model.backbone.fpn.inner_blocks[0][1].weight.requires_grad

    # v2's weights in v1's layout: one line saying what they need
    with pytest.raises(WeightsError, match=r"^[^\n]*needs v2's architecture, as the finetune preset has it.*missing"):
        build_model(load_config("coco", ["model.num_classes=1", "model.weights=torchvision-coco-v2",
                                         "model.cpu_speedups=false"]).model)


def test_a_3_class_run_fine_tunes_to_1_class_in_one_command(tmp_path, tiny_config, tiny_yaml, capsys):
    three = tmp_path / "three"  # a training's run folder (without the report: not what this is about)
    train(tiny_config(three, "model.num_classes=3", "data.synthetic_num_classes=3", "train.max_iters=1",
                      "eval.mask_ceiling=false"), progress=False)
    one = tmp_path / "one"
    assert main(["train", str(tiny_yaml), "--out", str(one), "--set", f"model.weights={three / 'last.pt'}",
                 "--set", "model.num_classes=1", "--set", "data.synthetic_num_classes=1",
                 "--set", "train.max_iters=2", "--set", "eval.num_vis=0", "--set", "eval.mask_ceiling=false"]) == 0
    line = f"model.weights {three / 'last.pt'}: 3 classes, the model 1: class-dependent layers {CLASS_LAYERS}"
    assert line in capsys.readouterr().out
    state = torch.load(one / "last.pt", weights_only=True)
    assert state["model"]["box_head.cls_score.weight"].shape[0] == 2 and state["iteration"] == 2
