"""Hostile and broken exported files (issue 31): a .pt2 runs none of the code it could name (pickles, compiled
packages, sympy expressions, callables of its graph), a file that does not load is one line with nothing of torch's
logs, a graph with our metadata but other inputs / outputs or metadata of other values is refused at load, an
export into a folder that cannot be written names the file before the trace, and the images an exported graph
cannot take are recorded while the good ones after them are predicted."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.app.predict import PredictOptions, run_prediction
from maskrcnn.cli import main
from maskrcnn.export import OUTPUT_NAMES, ExportInfo
from maskrcnn.export.exporter import METADATA_KEY, PT2_EXTRA_FILE
from maskrcnn.export.pt2_check import check_pt2_archive
from maskrcnn.export.runtime import ProgramPredictor


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


INFO = ExportInfo(class_names=["thing"], paste_mode="exact", detections_per_img=2, mask_size=4)


class _Scaled(torch.nn.Module):
    """A module with a dynamic batch size, so that its graph holds size expressions (sympy strings)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x) * x.shape[0]


def rewrite_pt2(source: Path, target: Path, change) -> Path:
    """A copy of the .pt2 `source` with each entry's bytes replaced by change(name relative to the root, bytes)."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for name in archive.namelist():
            out.writestr(name, change(name.split("/", 1)[1], archive.read(name)))
    return target


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "clean.pt2"
    program = torch.export.export(_Scaled(), (torch.ones(4, 3),), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, path, extra_files={PT2_EXTRA_FILE: INFO.to_json()})
    return path


def _edit_graph(edit):
    """change() for rewrite_pt2: models/model.json through edit(parsed json) -> parsed json."""
    def change(name: str, data: bytes) -> bytes:
        return json.dumps(edit(json.loads(data))).encode() if name.startswith("models/") else data
    return change


def _replace_first(value, key: str, new):
    """`value` with the first `key` found (depth first) set to `new`; asserts there is one."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if key in item:
                item[key] = new
                return value
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError(f"no {key!r} in the graph")


def _payload_cases(marker: Path) -> dict:
    """name -> (change for rewrite_pt2, what the refusal names): each a way a .pt2 makes torch.export.load (or the
    loaded program) run code."""
    touch = f"__import__('os').system('touch {marker}')"

    def sample_inputs(name: str, data: bytes) -> bytes:
        return pickle.dumps(Payload(marker)) if name.startswith("data/sample_inputs/") else data

    def opaque_constant(name: str, data: bytes) -> bytes:
        if name.endswith("_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                "use_pickle": True, "tensor_meta": None}}}).encode()
        return data

    return {
        "sympy expression": (_edit_graph(lambda g: _replace_first(g, "expr_str", touch)), "size expression"),
        "graph target": (_edit_graph(lambda g: _replace_first(g, "target", "torch.os.system")), "the graph calls"),
        "dunder path": (_edit_graph(lambda g: _replace_first(
            g, "target", "torch.ops.aten.__class__.__init__.__globals__")), "the graph calls"),
        "sample inputs": (sample_inputs, "sample inputs that only load by unpickling"),
        "opaque constant": (opaque_constant, "'c' is stored as a pickle or an object"),
    }


@pytest.mark.parametrize("case", ["sympy expression", "graph target", "dunder path", "sample inputs",
                                  "opaque constant"])
def test_a_pt2_that_would_run_code_is_refused_before_torch_reads_it(clean_pt2, tmp_path, case):
    marker = tmp_path / "ran"
    change, named = _payload_cases(marker)[case]
    evil = rewrite_pt2(clean_pt2, tmp_path / "evil.pt2", change)
    with pytest.raises(ValueError) as info:
        ProgramPredictor.load(evil)
    assert not marker.exists()
    assert str(info.value).startswith(f"{evil}: refused, ") and named in str(info.value), str(info.value)


def test_compiled_code_and_legacy_weights_in_a_pt2_are_refused(clean_pt2, tmp_path):
    """An AOTInductor package's shared library (loaded with dlopen) and a legacy pickled weights file."""
    root = zipfile.ZipFile(clean_pt2).namelist()[0].split("/")[0]
    for extra, named in ((f"{root}/data/aotinductor/model/model.so", "data/aotinductor/model/model.so: not part"),
                         (f"{root}/data/weights/model.pt", "data/weights/model.pt: a pickled or legacy")):
        evil = tmp_path / "evil.pt2"
        rewrite_pt2(clean_pt2, evil, lambda name, data: data)
        with zipfile.ZipFile(evil, "a") as archive:
            archive.writestr(extra, b"\x7fELF")
        with pytest.raises(ValueError, match="refused") as info:
            check_pt2_archive(evil)
        assert named in str(info.value)


def test_the_clean_program_passes_the_check_and_its_outputs_are_checked_at_load(clean_pt2):
    """What torch.export writes passes (size expressions, aten operators, raw weights); a program of other outputs
    than `maskrcnn export`'s is refused when loaded, not at its first run."""
    check_pt2_archive(clean_pt2)
    with pytest.raises(ValueError, match=f"{clean_pt2}: a program of 1 inputs and 1 outputs; `maskrcnn export` "
                                         f"writes 1 input"):
        ProgramPredictor.load(clean_pt2)


def _one_image(tmp_path: Path) -> Path:
    image = tmp_path / "im.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(image)
    return image


def test_a_broken_pt2_is_one_line_without_torchs_logs(clean_pt2, tmp_path, capfd):
    """Truncated (no zip directory: the check refuses it) and one without a weight's entry (the check passes,
    torch's reader fails and logs a traceback): one line on the terminal, nothing of torch's loggers, the cause
    torch logged in it."""
    image = _one_image(tmp_path)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(clean_pt2.read_bytes()[:3000])
    missing = rewrite_pt2(clean_pt2, tmp_path / "missing.pt2", lambda name, data: data)
    with zipfile.ZipFile(clean_pt2) as source, zipfile.ZipFile(missing, "w") as out:
        for name in source.namelist():
            if not name.endswith("data/weights/weight_0"):
                out.writestr(name, source.read(name))
    for program, cause in ((truncated, "not a complete .pt2 archive"), (missing, "data/weights/weight_0")):
        capfd.readouterr()
        assert main(["predict", str(program), str(image), "--out", str(tmp_path / "p")]) == 2
        captured = capfd.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"maskrcnn: error: {program}: "), captured.err
        assert cause in lines[0] and "Traceback" not in captured.err + captured.out


def _onnx(path: Path, outputs: list[str], metadata: str) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Identity", ["images"], [name]) for name in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 4, 4]) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {METADATA_KEY: metadata})
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("outputs, metadata, message", [
    (["boxes", "scores"], INFO.to_json(), "a graph of inputs ['images'] and outputs ['boxes', 'scores']"),
    (list(OUTPUT_NAMES), json.dumps({**json.loads(INFO.to_json()), "paste_mode": "bogus"}), "metadata is not what"),
    (list(OUTPUT_NAMES), json.dumps({**json.loads(INFO.to_json()), "class_names": "thing"}), "metadata is not what"),
    (list(OUTPUT_NAMES), json.dumps({**json.loads(INFO.to_json()), "mask_size": -1}), "metadata is not what"),
    (list(OUTPUT_NAMES), "[1, 2]", "metadata is not what"),
])
def test_an_onnx_graph_with_our_metadata_but_other_outputs_or_values_is_refused_at_load(tmp_path, capsys, outputs,
                                                                                          metadata, message):
    pytest.importorskip("onnxruntime")
    model = _onnx(tmp_path / "other.onnx", outputs, metadata)
    assert main(["predict", str(model), str(_one_image(tmp_path)), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"maskrcnn: error: {model}: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p").exists()


def test_openvino_refuses_a_graph_of_other_outputs_too(tmp_path):
    pytest.importorskip("openvino")
    from maskrcnn.export.runtime import OpenVinoPredictor

    model = _onnx(tmp_path / "other.onnx", ["boxes"], INFO.to_json())
    with pytest.raises(ValueError, match=r"a graph of inputs \['images'\] and outputs \['boxes'\]"):
        OpenVinoPredictor(model)


def test_exporting_into_a_folder_that_cannot_be_written_names_the_file_before_the_trace(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (Path("/proc/model.onnx"), blocker / "model.pt2"):
        assert main(["export", str(tiny_run / "last.pt"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"maskrcnn: error: export: {out}: cannot be written in {out.parent}"), err
        assert len(err.splitlines()) == 1


class _GraphLikePredictor:
    """Stands in for an exported graph: refuses (as the graph does) an image under 32 pixels a side, else one
    detection per image."""

    info = INFO

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        assert min(images.shape[-2:]) >= 32, f"the graph was given {tuple(images.shape)}"
        self.sizes += [tuple(images.shape[-2:])] * len(images)
        B = len(images)
        boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0], [0, 0, 0, 0]]).expand(B, 2, 4)
        return {"boxes": boxes, "scores": torch.tensor([[0.9, 0.0]]).expand(B, 2),
                "labels": torch.ones(B, 2, dtype=torch.int64), "masks": torch.ones(B, 2, 4, 4),
                "num_detections": torch.ones(B, dtype=torch.int64)}


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_images_an_exported_graph_cannot_take_are_recorded_and_the_good_ones_after_them_predicted(
        tmp_path, monkeypatch, suffix):
    """A 2 x 3000 image (a zero side for any resize) and one of 20 x 50 (under the graph's 32 pixels), between
    good ones: both recorded with their reason, the others predicted, in input order."""
    import maskrcnn.export

    graph = _GraphLikePredictor()
    monkeypatch.setattr(maskrcnn.export, "load_predictor", lambda path, **kwargs: graph)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("a.png", (40, 48)), ("b.png", (2, 3000)), ("c.png", (20, 50)), ("d.png", (64, 40))):
        Image.fromarray(np.full((*size, 3), 90, dtype=np.uint8)).save(folder / name)
    model = tmp_path / f"model{suffix}"
    model.write_bytes(b"")
    run_prediction(model, [str(folder)], tmp_path / "pred",
                   options=PredictOptions(score_thresh=0.5, batch_size=4, progress=False))
    records = json.loads((tmp_path / "pred" / "images.json").read_text())
    assert [Path(r["file_name"]).name for r in records] == ["a.png", "b.png", "c.png", "d.png"]
    assert ["error" in r for r in records] == [False, True, True, False]
    assert records[1]["error"] == f"{folder / 'b.png'}: 3000 x 2 pixels: an exported model takes images of at " \
                                  f"least 32 pixels a side; pad it or predict with the checkpoint"
    assert records[2]["error"].startswith(f"{folder / 'c.png'}: 50 x 20 pixels: an exported model takes images")
    assert sorted(graph.sizes) == [(40, 48), (64, 40)]
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert sorted(Path(p["file_name"]).name for p in predictions) == ["a.png", "d.png"]
