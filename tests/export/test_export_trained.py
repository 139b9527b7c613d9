"""Export of a model trained by `maskrcnn train`: the `maskrcnn export` command, ONNX Runtime and the ExportedProgram
give the eager model's detections with the fixed batched contract on generated images; `maskrcnn predict` on the
file; static int8 on generated images and on Penn-Fudan photos."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from exported import (
    assert_contract,
    assert_most_detections_kept,
    assert_same_detections,
    batches,
    generated_images,
    penn_fudan_photos,
    pooled_feature_maps,
    relative_error,
)
from PIL import Image

from maskrcnn.app import deploy
from maskrcnn.cli import main
from maskrcnn.engine.checkpoint import load_model
from maskrcnn.export import OnnxPredictor, OpenVinoPredictor, ProgramPredictor, load_predictor
from maskrcnn.model import precision

pytest.importorskip("onnxruntime", reason="the optional extra maskrcnn[export] is not installed")


# OpenVINO's detections of every batch of generated images from an ONNX file (argv 1), in fp32 and, on a CPU with
# bf16 units, bf16, saved to argv 2 as {precision: {"info": ExportInfo JSON, "detections": {batch: [dict]}}}
OPENVINO_RUN = """
import sys
import torch
from exported import batches, generated_images
from maskrcnn.export import OpenVinoPredictor
from maskrcnn.model.precision import cpu_has_bf16
images, outputs = generated_images(), {}
for precision in ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]:
    predictor = OpenVinoPredictor(sys.argv[1], precision=precision)
    outputs[precision] = {"info": predictor.info.to_json(),
                          "detections": {name: predictor(batch) for name, batch in batches(images).items()}}
torch.save(outputs, sys.argv[2])
"""


def subprocess_env() -> dict[str, str]:
    """This process's environment, with its import path (the package and tests/export) for a child Python."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run):
    """The session's tiny run (`tiny_run`, trained by `maskrcnn train`) exported by one `maskrcnn export` to .onnx
    and .pt2; also what the export command printed."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = tiny_run / "last.pt"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(checkpoint), "--out", str(root / "model.onnx"), str(root / "model.pt2")]) == 0
    model = load_model(checkpoint).model
    predictors = {runtime: load_predictor(root / f"model.{runtime}") for runtime in ("onnx", "pt2")}
    return root, checkpoint, model.eval(), printed.getvalue(), predictors


def test_export_command_prints_what_it_wrote_and_the_contract(trained):
    root, _, _, printed, _ = trained
    assert f"wrote {root / 'model.onnx'}" in printed and "ONNX (opset 18)" in printed
    assert f"wrote {root / 'model.pt2'}" in printed and "torch.export ExportedProgram" in printed
    assert "images          float32 [B, 3, H, W]" in printed
    assert "boxes           float32 [B, 10, 4]" in printed and "masks           float32 [B, 10, 28, 28]" in printed
    assert "labels          int64   [B, 10]  1..2" in printed and "num_detections  int64   [B]" in printed
    assert "classes: " in printed


@pytest.mark.parametrize("runtime", ["onnx", "pt2"])
@pytest.mark.parametrize("batch", ["one", "three", "two_and_blank", "odd"])
def test_trained_model_exports_equal_eager(trained, runtime, batch):
    """On generated images; the tiny model detects something on each of them (10 detections at its 0.05 score
    threshold, the blank image too), so the comparison is of detections, not of empty lists."""
    _, _, model, _, predictors = trained
    images = batches(generated_images())[batch]
    predictor = predictors[runtime]
    assert isinstance(predictor, OnnxPredictor if runtime == "onnx" else ProgramPredictor)
    with torch.no_grad():
        expected = model(images)
    assert all(len(e["boxes"]) > 0 for e in expected), [len(e["boxes"]) for e in expected]
    assert_same_detections(expected, predictor(images))
    assert_contract(predictor, images, 10, 28, 2)


def test_predict_runs_the_onnx_file_like_the_checkpoint(trained, tmp_path, capsys):
    root, checkpoint, _, _, _ = trained
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(generated_images()[:2]):
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"p{index}.png")
    for source, out in ((checkpoint, "eager"), (root / "model.onnx", "onnx")):
        assert main(["predict", str(source), str(folder), "--out", str(tmp_path / out), "--score-thresh", "0"]) == 0
    # OpenVINO in a process of its own (`openvino_detections`)
    command = [sys.executable, "-m", "maskrcnn", "predict", str(root / "model.onnx"), str(folder), "--runtime",
               "openvino", "--out", str(tmp_path / "openvino"), "--score-thresh", "0"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert completed.returncode == 0, completed.stderr[-3000:]
    eager = json.loads((tmp_path / "eager" / "predictions.json").read_text())
    key = lambda p: (p["image_id"], p["category_id"], round(p["score"], 2))  # noqa: E731
    for runtime in ("onnx", "openvino"):
        overlays = sorted(p.name for p in (tmp_path / runtime).glob("*.png"))
        assert len(overlays) == 2 and overlays == sorted(p.name for p in (tmp_path / "eager").glob("*.png"))
        exported = json.loads((tmp_path / runtime / "predictions.json").read_text())
        assert len(exported) == len(eager) > 0
        for e, o in zip(sorted(eager, key=key), sorted(exported, key=key)):
            assert (e["image_id"], e["category_id"], e["file_name"]) == (o["image_id"], o["category_id"],
                                                                         o["file_name"])
            assert abs(e["score"] - o["score"]) <= 1e-3 and np.allclose(e["bbox"], o["bbox"], atol=0.05), runtime


def test_predict_and_export_errors_name_the_file(trained, tmp_path, capsys):
    root, checkpoint, _, _, _ = trained
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "model.zip")]) == 2
    assert "model.zip" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx")]) == 2
    assert "named twice" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
    not_onnx = tmp_path / "broken.onnx"
    not_onnx.write_text("not a model")
    image = tmp_path / "im.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(image)
    assert main(["predict", str(not_onnx), str(image), "--out", str(tmp_path / "p")]) == 2
    assert "broken.onnx" in capsys.readouterr().err
    assert main(["predict", str(root / "model.onnx"), str(image), "--out", str(tmp_path / "p"),
                 "--set", "model.box_head.score_thresh=0.9"]) == 2
    assert "export again" in capsys.readouterr().err
    for source, flags, error in ((checkpoint, ["--runtime", "openvino"], "applies to exported models"),
                                 (root / "model.pt2", ["--runtime", "openvino"], "runs only in PyTorch"),
                                 (root / "model.onnx", ["--runtime", "tensorrt"], "onnxruntime, openvino"),
                                 (root / "model.onnx", ["--precision", "bf16"], "offered by --runtime openvino"),
                                 (root / "model.onnx", ["--runtime", "openvino", "--precision", "auto"],
                                  "fp32 or bf16")):
        assert main(["predict", str(source), str(image), "--out", str(tmp_path / "p"), *flags]) == 2
        assert error in capsys.readouterr().err, flags
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def openvino_detections(trained, tmp_path_factory):
    """`OPENVINO_RUN` on the trained model's ONNX file, in a process of its own: OpenVINO loaded into the test
    process made it end in a segmentation fault later in the session (after other tests' trainings and
    subprocesses, or at exit) in 3 of 4 full runs; never in a process of its own, as `maskrcnn predict` runs it."""
    pytest.importorskip("openvino", reason="the optional extra maskrcnn[openvino] is not installed")
    out = tmp_path_factory.mktemp("openvino") / "detections.pt"
    completed = subprocess.run([sys.executable, "-c", OPENVINO_RUN, str(trained[0] / "model.onnx"), str(out)],
                               capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_openvino_runs_the_onnx_file_like_the_eager_model(trained, openvino_detections):
    """Every batch but the "odd" one: OpenVINO's CPU plugin computes in float32 what the graph computes in float64
    (the resized image size), so for about 1 in 10 image sizes its resize is one pixel off the eager model's."""
    _, _, model, _, predictors = trained
    assert openvino_detections["fp32"]["info"] == predictors["onnx"].info.to_json()
    for name, images in batches(generated_images()).items():
        if name == "odd":
            continue
        with torch.no_grad():
            expected = model(images)
        assert_same_detections(expected, openvino_detections["fp32"]["detections"][name])


def test_openvino_bf16_keeps_the_detections_and_is_refused_without_bf16_units(trained, openvino_detections,
                                                                              monkeypatch):
    """OpenVINO's bf16 hint against its fp32 run: on every image at least 6 of the 10 detections kept, as int8
    (this 4-iteration model scores every detection 0.33 +- 0.003, and bf16 reorders such near-ties), with mask IoU
    >= 0.7 (its mask probabilities lie near the 0.5 threshold, where bf16 flips pixels: 0.75 seen on one
    detection). On a trained model bf16 keeps the AP: benchmarks/runtime_accuracy.py."""
    assert ("bf16" in openvino_detections) == precision.cpu_has_bf16()
    if "bf16" in openvino_detections:
        fp32, bf16 = (openvino_detections[p]["detections"] for p in ("fp32", "bf16"))
        for name in batches(generated_images()):
            assert_most_detections_kept(fp32[name], bf16[name], 10, 6, score_diff=0.01, min_mask_iou=0.7, where=name)
    monkeypatch.setenv(precision.NO_BF16_ENV, "1")
    with pytest.raises(precision.PrecisionError, match="no bf16 units"):
        OpenVinoPredictor(trained[0] / "model.onnx", precision="bf16")


@pytest.fixture(scope="module")
def int8_export(trained, tmp_path_factory):
    """`maskrcnn export --int8 DIR` of the trained checkpoint to two files, calibrated on the 3 generated images
    saved as PNGs (the fp32 export is the one `trained` wrote already: not done again). Returns (path, its copy)."""
    root, checkpoint, _, _, predictors = trained
    work = tmp_path_factory.mktemp("int8")
    calibration = work / "calibration"
    calibration.mkdir()
    for index, image in enumerate(generated_images()):
        pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
        Image.fromarray(pixels).save(calibration / f"{index}.png")

    def exported_already(model, path, *, class_names, opset):
        shutil.copy(root / "model.onnx", path)
        return predictors["onnx"].info

    out, copy = work / "int8.onnx", work / "copy" / "int8.onnx"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(deploy, "export_model", exported_already)
        assert main(["export", str(checkpoint), "--out", str(out), str(copy), "--int8", str(calibration)]) == 0
    return out, copy


# The int8 graph's FPN outputs (what RoiAlign pools) against the fp32 graph's, ||int8 - fp32|| / ||fp32|| over a
# batch of 3: 0.18 on the generated images and 0.21 on Penn-Fudan photos (calibrated on either; 0.17-0.41 level by
# level, the 2x2 level worst; AVX2 CPU without VNNI), 0.85-0.87 with a broken calibration (all-zero images, or
# images 50x darker than those quantised).
MAX_FEATURE_ERROR = 0.5


def test_int8_export_quantises_the_backbone_and_fpn_and_keeps_the_detections(trained, int8_export):
    """On generated images: the 28 backbone + FPN convolutions (ResNet-18: stem, 16 block convs, 3 downsamples;
    FPN: 4 lateral + 4 output) get int8 weights, the RPN and mask head convolutions keep fp32 ones, the FPN outputs
    stay within MAX_FEATURE_ERROR of the fp32 graph's, and on every image the int8 graph keeps at least 6 of the
    fp32 graph's 10 detections (same label, box IoU >= 0.9), with |score difference| <= 0.01 and mask IoU >= 0.9.
    Not all 10: this 4-iteration model scores every detection 0.33 +- 0.003, and int8 reorders such near-ties, so
    some detections at the end of the list change (7 of 10 kept at worst; 0-4 with a broken calibration)."""
    onnx = pytest.importorskip("onnx")
    root, _, _, _, predictors = trained
    out, copy = int8_export
    assert copy.read_bytes() == out.read_bytes()  # two names, one quantised model

    graph = onnx.load(str(out)).graph
    producer = {output: node for node in graph.node for output in node.output}
    convolutions = [node for node in graph.node if node.op_type == "Conv"]
    int8 = [node for node in convolutions if getattr(producer.get(node.input[1]), "op_type", "") == "DequantizeLinear"]
    assert len(int8) == 28
    fp32_weights = {node.input[1] for node in convolutions if node not in int8}
    assert fp32_weights == {"model.rpn.head.conv.0.0.weight", "model.rpn.head.cls_logits.weight",
                            "model.rpn.head.bbox_pred.weight", "model.mask_head.convs.0.weight",
                            "model.mask_head.logits.weight"}

    quantised = OnnxPredictor(out)
    assert quantised.info == predictors["onnx"].info
    images = batches(generated_images())
    error = relative_error(pooled_feature_maps(root / "model.onnx", images["three"]),
                           pooled_feature_maps(out, images["three"]))
    assert error <= MAX_FEATURE_ERROR, f"FPN outputs {error:.2f} off the fp32 graph's"
    for name, batch in images.items():
        assert_most_detections_kept(predictors["onnx"](batch), quantised(batch), 10, 6, score_diff=0.01,
                                    min_mask_iou=0.9, where=name)


def test_int8_export_keeps_the_feature_maps_and_the_scores_of_penn_fudan_photos(trained, int8_export):
    """On 3 street photos (skipped without Penn-Fudan), with the int8 graph calibrated on generated images: its FPN
    outputs within MAX_FEATURE_ERROR of the fp32 graph's, and 10 detections per photo whose scores, sorted, lie
    within 0.01 of the fp32 graph's sorted scores (at most 0.0015 seen; the k-th best score moves no more than
    the scores do). Not the pairing of detections: on photos this 4-iteration model's proposals are near-ties
    (its scores 0.33 +- 0.003), and int8 changes which of them make the top 20 proposals, so that 4 to 8 of a
    photo's 10 detections have an fp32 one of the same label with box IoU >= 0.9 (also among the fp32 model's
    40 candidates before NMS) with a sound calibration, 0 to 4 with a broken one: no line to draw between."""
    root, _, _, _, predictors = trained
    out, _ = int8_export
    photos = penn_fudan_photos(3)
    error = relative_error(pooled_feature_maps(root / "model.onnx", photos), pooled_feature_maps(out, photos))
    assert error <= MAX_FEATURE_ERROR, f"FPN outputs {error:.2f} off the fp32 graph's"
    for index, (expected, actual) in enumerate(zip(predictors["onnx"](photos), OnnxPredictor(out)(photos))):
        assert len(expected["scores"]) == len(actual["scores"]) == 10, f"photo {index}: number of detections"
        difference = (expected["scores"].sort().values - actual["scores"].sort().values).abs().max()
        assert difference <= 0.01, f"photo {index}: sorted scores {difference:.4f} apart"


def test_int8_export_errors_name_the_option(trained, tmp_path, capsys):
    _, checkpoint, _, _, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m.pt2"), "--int8", str(empty)]) == 2
    assert "m.pt2" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--int8", str(empty)]) == 2
    assert f"{empty}: no image files" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--int8", str(tmp_path / "no")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
