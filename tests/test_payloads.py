"""No code from any file this package reads (issue 31, item 1): a payload planted in each loadable format (a .pt
checkpoint, a file in the torch hub cache that model.weights reads, a .pt2 whose weight entry is a pickle, an ONNX
file's metadata, a YAML config's python tags) never runs, and each is refused with one line, exit status 2."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from data.datafiles import write_image
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

from maskrcnn.cli import main
from maskrcnn.export.exporter import METADATA_KEY, PT2_EXTRA_FILE


class Payload:
    """Unpickling this runs `touch <marker>`: what a crafted file does to whoever unpickles it."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Tiny(torch.nn.Module):
    """A module whose .pt2 stands in for an export: the checks read the archive, not the model."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)


def write_pt2(path: Path) -> Path:
    """A .pt2 of `_Tiny` with the extra file `maskrcnn export` writes."""
    program = torch.export.export(_Tiny(), (torch.ones(2, 3),))
    torch.export.save(program, path, extra_files={PT2_EXTRA_FILE: "{}"})
    return path


def rewrite_pt2(source: Path, target: Path, change) -> Path:
    """A copy of the .pt2 `source` with each entry's bytes replaced by change(name relative to the root, bytes)."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for name in archive.namelist():
            out.writestr(name, change(name.split("/", 1)[1], archive.read(name)))
    return target


def pickled_weight_pt2(source: Path, target: Path, marker: Path) -> Path:
    """The .pt2 of the issue: its first weight's entry marked as pickled and its bytes the payload's pickle
    (`torch.export.load` reads it with torch.load(weights_only=False))."""
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            for meta in config["config"].values():
                meta["use_pickle"] = True
            return json.dumps(config).encode()
        if name.startswith("data/weights/weight_"):
            return pickle.dumps(Payload(marker))
        return data
    return rewrite_pt2(source, target, change)


def onnx_with_pickled_metadata(path: Path, marker: Path) -> Path:
    """A valid ONNX graph (an identity) whose maskrcnn metadata is the payload's pickle (protocol 0: text)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["boxes"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.helper.set_model_props(model, {METADATA_KEY: pickle.dumps(Payload(marker), protocol=0).decode()})
    onnx.save(model, path)
    return path


@pytest.fixture
def hub_cache(monkeypatch, tmp_path) -> Path:
    """An empty torch hub cache (TORCH_HOME) that is never downloaded into; returns its checkpoints folder."""
    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def test_a_payload_in_any_file_the_package_reads_never_runs(tmp_path, capsys, hub_cache, tiny_yaml):
    image = tmp_path / "a.png"
    write_image(image, 40, 48)
    markers = {name: tmp_path / f"ran_{name}" for name in ("checkpoint", "hub", "pt2", "onnx", "yaml")}

    checkpoint = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 1, "extra": Payload(markers["checkpoint"])}, checkpoint)
    cached = hub_cache / Path(MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url).name  # model.weights reads it
    torch.save({"backbone.body.conv1.weight": torch.ones(1), "x": Payload(markers["hub"])}, cached)
    program = pickled_weight_pt2(write_pt2(tmp_path / "clean.pt2"), tmp_path / "evil.pt2", markers["pt2"])
    onnx_file = onnx_with_pickled_metadata(tmp_path / "evil.onnx", markers["onnx"])
    config = tmp_path / "evil.yaml"
    config.write_text(f"base: tiny\ntrain:\n  lr: !!python/object/apply:os.system ['touch {markers['yaml']}']\n")

    commands = {
        "checkpoint": ["predict", str(checkpoint), str(image), "--out", str(tmp_path / "p1")],
        "hub": ["train", "finetune", "--set", "model.num_classes=1", "--set", "model.weights=torchvision-coco-v2",
                "--set", "data.format=synthetic", "--set", "data.synthetic_num_classes=1", "--set",
                "data.synthetic_image_size=[64, 64]", "--out", str(tmp_path / "r1")],
        "pt2": ["predict", str(program), str(image), "--out", str(tmp_path / "p2")],
        "onnx": ["predict", str(onnx_file), str(image), "--out", str(tmp_path / "p3")],
        "yaml": ["train", str(config), "--out", str(tmp_path / "r2")],
    }
    named = {"checkpoint": f"{checkpoint}: refused", "hub": f"{cached}", "pt2": f"{program}: refused",
             "onnx": f"{onnx_file}: its 'maskrcnn' metadata is not what", "yaml": f"{config}"}  # what read it
    for name, argv in commands.items():
        capsys.readouterr()
        status = main(argv)
        err = capsys.readouterr().err.strip()
        assert not markers[name].exists(), f"{name}: the payload ran"
        assert status == 2, (name, err)
        assert len(err.splitlines()) == 1 and err.startswith("maskrcnn: error: "), (name, err)
        assert "Traceback" not in err and named[name] in err, (name, err)
    assert not any(marker.exists() for marker in markers.values())
