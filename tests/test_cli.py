"""The `maskrcnn` command: every subcommand on tiny synthetic data, help texts, and one-line errors."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import maskrcnn.cli
from maskrcnn.cli import main
from maskrcnn.config import config_path, load_config, preset_names, preset_path
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.run_folder import RunFolder
from maskrcnn.fileio import read_jsonl


def flat_overrides(values: dict, prefix: str = "") -> list[str]:
    """{"train": {"lr": 0.1}} -> ["train.lr=0.1"] (values as JSON, which YAML reads back)."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += flat_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "train", "evaluate", "predict", "data"):
        assert command in text
    for argv in (["demo", "-h"], ["train", "-h"], ["evaluate", "-h"], ["predict", "-h"], ["data", "coco-subset", "-h"],
                 ["data", "pennfudan", "-h"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        assert "usage: maskrcnn" in capsys.readouterr().out


def test_help_imports_no_torch():
    """`maskrcnn --help` must not pay for torch (seconds): the package's public names load on first use."""
    script = ("import sys, maskrcnn.cli\n"
              "try:\n    maskrcnn.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    src = str(Path(maskrcnn.cli.__file__).resolve().parents[1])  # the package under test, wherever it is
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": src})
    assert done.stdout.strip().endswith("no torch")
    assert "usage: maskrcnn" in done.stdout


def test_package_names_resolve_lazily():
    import maskrcnn
    from maskrcnn.model import build_model

    assert maskrcnn.build_model is build_model
    assert "build_model" in dir(maskrcnn)
    with pytest.raises(AttributeError, match="no_such_name"):
        maskrcnn.no_such_name  # noqa: B018


def test_presets_ship_inside_the_package_and_configs_links_to_them():
    assert preset_path("demo").is_file()
    assert (Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").resolve() == preset_path("demo")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_by_name(name):
    assert config_path(name) == preset_path(name)
    cfg = load_config(name)
    expected = {"demo": 3, "seed": 3, "pennfudan": 1, "coco": None}  # coco: from the json
    if name in expected:
        assert cfg.model.num_classes == expected[name]


def test_presets_name_no_machine_paths():
    """A preset is usable on any machine: its data paths are settings the user gives (`--set`), not this
    project's folders."""
    for name in preset_names():
        data = load_config(preset_path(name)).data
        assert (data.root, data.train_images, data.train_annotations, data.val_images, data.val_annotations) == \
            ("",) * 5, name


def test_demo_runs_and_writes_the_report(tmp_path, capsys, tiny_values):
    overrides = flat_overrides(tiny_values) + ["train.max_iters=2"]
    args = ["demo", "--out", str(tmp_path / "demo"), "--minutes", "5"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "demo" / "report.html") in out and "original metric" in out
    assert (tmp_path / "demo" / "report.md").is_file()
    assert load_config(tmp_path / "demo" / "config.yaml").train.max_minutes == 5.0


def test_train_resume_evaluate_predict(tiny_run, tiny_yaml, copy_run, tmp_path, capsys):
    assert (tiny_run / "report.html").is_file() and (tiny_run / "last.pt").is_file()
    out = copy_run()
    more = load_checkpoint(tiny_run / "last.pt")["iteration"] + 1
    assert main(["train", str(tiny_yaml), "--out", str(out), "--set", f"train.max_iters={more}", "--resume"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == list(range(1, more + 1))  # resumed, not restarted

    assert main(["evaluate", str(out / "last.pt"), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and "voc" in metrics
    assert (tmp_path / "ev" / "report.md").is_file()

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((48, 40, 3), 60 * i, dtype=np.uint8)).save(images / f"im{i}.png")
    capsys.readouterr()
    assert main(["predict", str(out / "last.pt"), str(images), "--out", str(tmp_path / "pred"),
                 "--score-thresh", "0.0"]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == ["im0.png_pred.png", "im1.png_pred.png"]
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation", "file_name"} <= set(p) for p in predictions)
    assert Image.open(tmp_path / "pred" / "im0.png_pred.png").size == (40, 48)


def test_evaluate_with_data_config(tiny_run, tiny_yaml, tmp_path):
    other = tmp_path / "other.yaml"
    values = yaml.safe_load(tiny_yaml.read_text())
    values["data"]["synthetic_val_size"] = 3
    other.write_text(yaml.safe_dump(values))
    assert main(["evaluate", str(tiny_run / "last.pt"), "--data-config", str(other), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_images"] == 3


def test_evaluate_takes_a_preset_by_name_as_data_config(tiny_run, tmp_path, capsys):
    """`--data-config coco` is the preset, its data paths given with --set: the error is about the missing
    annotations, not "config file not found: coco"."""
    missing = tmp_path / "val.json"
    assert main(["evaluate", str(tiny_run / "last.pt"), "--data-config", "coco", "--out", str(tmp_path / "ev"),
                 "--set", f"data.val_images={tmp_path}", "--set", f"data.val_annotations={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maskrcnn: error:") and str(missing) in err and "not found: coco" not in err, err


def one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("maskrcnn: error:")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_errors_are_one_line(tmp_path, capsys, tiny_run, tiny_yaml):
    config, out = tiny_yaml, tiny_run
    one_line_error(capsys, ["train", str(tmp_path / "missing.yaml")], "missing.yaml")
    one_line_error(capsys, ["train", str(config), "--set", "train.lr=fast"], "train.lr")
    one_line_error(capsys, ["train", str(config), "--set", "train.nope=1"], "train.nope")
    one_line_error(capsys, ["evaluate", str(tmp_path / "none.pt")], "none.pt")
    one_line_error(capsys, ["predict", str(out / "last.pt"), str(tmp_path / "no.png"), "--out", str(tmp_path)], "no.png")
    one_line_error(capsys, ["data", "pennfudan", str(tmp_path / "pf"), "--source", str(tmp_path)], "PNGImages")


def test_precision_flag_of_evaluate_and_predict(tmp_path, capsys, tiny_run, monkeypatch):
    from maskrcnn.model import precision

    out = tiny_run
    monkeypatch.setenv(precision.NO_BF16_ENV, "1")  # a CPU without bf16 units: bf16 is refused in one line
    one_line_error(capsys, ["evaluate", str(out / "last.pt"), "--precision", "bf16", "--out", str(tmp_path / "ev")],
                   "model.precision: bf16 needs a CPU with bf16 units")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    one_line_error(capsys, ["predict", str(tmp_path / "model.onnx"), str(tmp_path / "im.png"), "--out",
                            str(tmp_path / "p"), "--precision", "fp32"], "runs in the precision it was exported in")
    monkeypatch.delenv(precision.NO_BF16_ENV)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # any CPU: oneDNN emulates bf16 units
    assert main(["evaluate", str(out / "last.pt"), "--precision", "bf16", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_images"] == 2


def test_resume_with_a_config_that_does_not_fit_is_one_line_and_changes_nothing(tmp_path, capsys, tiny_yaml,
                                                                                 copy_run):
    config, out = tiny_yaml, copy_run()
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    one_line_error(capsys, ["train", str(config), "--out", str(out), "--resume", "--set",
                            "model.box_head.representation_size=16"], f"{out / 'last.pt'}: weights do not fit")
    one_line_error(capsys, ["train", str(config), "--out", str(out), "--resume", "--set", "train.optimizer=adamw"],
                   f"{out / 'last.pt'}: trained with train.optimizer=sgd")
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_data_coco_subset(tmp_path, capsys):
    instances = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10},
                   {"id": 2, "file_name": "b.jpg", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0,
                         "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]},
                        {"id": 2, "image_id": 2, "category_id": 90, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0,
                         "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 3, "name": "car", "supercategory": "vehicle"},
                       {"id": 18, "name": "dog", "supercategory": "animal"},
                       {"id": 90, "name": "toothbrush", "supercategory": "indoor"}],
    }
    src = tmp_path / "instances.json"
    src.write_text(json.dumps(instances))
    assert main(["data", "coco-subset", str(src), str(tmp_path / "subset.json")]) == 0
    subset = json.loads((tmp_path / "subset.json").read_text())
    assert [c["name"] for c in subset["categories"]] == ["vehicles", "people", "animals"]
    assert [a["id"] for a in subset["annotations"]] == [1]
    assert "subset.json" in capsys.readouterr().out


def test_data_pennfudan_from_folder(tmp_path, capsys):
    source = tmp_path / "src" / "PennFudanPed"
    (source / "PNGImages").mkdir(parents=True)
    (source / "PedMasks").mkdir()
    assert main(["data", "pennfudan", str(tmp_path / "dest"), "--source", str(tmp_path / "src")]) == 0
    assert (tmp_path / "dest" / "PNGImages").is_dir()
    assert str(tmp_path / "dest") in capsys.readouterr().out


def test_crafted_checkpoint_runs_no_code_in_predict_evaluate_or_resume(tmp_path, capsys, tiny_yaml,
                                                                      write_malicious_checkpoint):
    config = tiny_yaml
    marker = tmp_path / "payload-ran"
    run = tmp_path / "run"
    run.mkdir()
    evil = run / "last.pt"
    write_malicious_checkpoint(evil, marker)
    image = tmp_path / "im.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    for argv in (["predict", str(evil), str(image), "--out", str(tmp_path / "pred")],
                 ["evaluate", str(evil), "--out", str(tmp_path / "ev")],
                 ["train", str(config), "--out", str(run), "--resume"]):
        one_line_error(capsys, argv, f"{evil}: refused")
        assert not marker.exists(), argv[0]


def test_checkpoint_with_nan_weights_is_refused_naming_file_and_tensor(tmp_path, capsys, tiny_run):
    out = tiny_run
    state = torch.load(out / "last.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    one_line_error(capsys, ["evaluate", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "ev")],
                   f"{tmp_path / 'nan.pt'}: weight {name} holds NaN")


def test_evaluate_replaces_a_runs_metrics_and_report_only_with_overwrite(capsys, tiny_run, copy_run):
    out = copy_run()
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "report.md")}
    one_line_error(capsys, ["evaluate", str(out / "last.pt"), "--out", str(out)], str(out / "metrics.json"),
                   "--overwrite")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert main(["evaluate", str(out / "last.pt"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.md").read_text().startswith(f"# Evaluation of {out / 'last.pt'}")


def test_sigint_saves_a_checkpoint_a_second_trainer_is_refused_and_resume_continues(tmp_path, capsys, tiny_values):
    """A real training process: while it runs, a second one on the same folder gets one line naming its pid;
    SIGINT makes it save last.pt at the end of the iteration and exit 130; --resume continues from there."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_values))
    run = tmp_path / "run"
    argv = ["train", str(config), "--out", str(run), "--set", "train.checkpoint_period=0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    trainer = subprocess.Popen([sys.executable, "-m", "maskrcnn", *argv, "--set", "train.max_iters=100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while len(training_iterations(run)) < 2:
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.stderr.read()[-2000:]
            time.sleep(0.2)
        one_line_error(capsys, [*argv, "--overwrite"], f"{run}: another training (pid {trainer.pid})")
        trainer.send_signal(signal.SIGINT)
        _, stderr = trainer.communicate(timeout=240)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 128 + signal.SIGINT, stderr[-2000:]
    done = training_iterations(run)
    assert done == list(range(1, len(done) + 1))  # the iteration running at SIGINT finished and was logged
    assert f"stopped by SIGINT after iteration {done[-1]}" in stderr and "Traceback" not in stderr
    assert load_checkpoint(run / "last.pt")["iteration"] == done[-1]
    assert main([*argv, "--resume", "--set", f"train.max_iters={done[-1] + 2}"]) == 0
    assert training_iterations(run) == list(range(1, done[-1] + 3))


def test_a_new_run_never_replaces_an_earlier_one_without_resume_or_overwrite(tmp_path, capsys, tiny_values):
    """The earlier run's files are refused by name before any work, and stay as they were; `demo` without --out
    moves on to the first free runs/demo-N instead."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_values))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 1, "loss": 1.0}\n')
    one_line_error(capsys, ["train", str(config), "--out", str(run)], f"{run / 'metrics.jsonl'} is from an earlier run",
                   "--resume", "--overwrite")
    assert (run / "metrics.jsonl").read_text() == '{"iteration": 1, "loss": 1.0}\n'
    (tmp_path / "demo-2").mkdir()
    (tmp_path / "demo-2" / "last.pt").write_bytes(b"earlier")
    (tmp_path / "demo-3").mkdir()  # an empty folder holds no run
    assert RunFolder(run).first_free().path == tmp_path / "run-2"
    assert RunFolder(tmp_path / "demo").first_free().path == tmp_path / "demo"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "best.pt").write_bytes(b"earlier")
    assert RunFolder(tmp_path / "demo").first_free().path == tmp_path / "demo-3"


def training_iterations(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [record["iteration"] for record in read_jsonl(path) if "loss" in record]


def test_predict_names_never_collide_and_unreadable_images_are_skipped(tiny_run, tmp_path, capsys):
    out = tiny_run
    for folder, name, size in (("a", "x.png", (20, 30)), ("b", "x.png", (22, 30)), ("a", "y.png", (24, 30)),
                               ("a", "y.jpg", (26, 30))):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.fromarray(np.full((*size, 3), 90, dtype=np.uint8)).save(tmp_path / folder / name)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    # a phone photo stored landscape (20 x 30) whose EXIF says "rotate 90 degrees clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8)).save(tmp_path / "b" / "phone.jpg", exif=exif.tobytes())
    capsys.readouterr()
    pred = tmp_path / "pred"
    argv = ["predict", str(out / "last.pt"), str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a" / "x.png"),
            "--out", str(pred), "--score-thresh", "0.0"]
    assert main(argv) == 0
    overlays = sorted(str(p.relative_to(pred)) for p in pred.rglob("*.png"))
    assert overlays == ["a/x.png_pred.png", "a/y.jpg_pred.png", "a/y.png_pred.png", "b/phone.jpg_pred.png",
                        "b/x.png_pred.png"]  # a/x.png named twice, predicted once
    assert Image.open(pred / "b" / "x.png_pred.png").size == (30, 22)
    assert Image.open(pred / "b" / "phone.jpg_pred.png").size == (20, 30)  # upright: 30 high, 20 wide
    err = capsys.readouterr().err
    assert f"maskrcnn: warning: skipped {tmp_path / 'a' / 'broken.png'}: cannot decode image" in err
    records = json.loads((pred / "images.json").read_text())
    assert [r["file_name"] for r in records] == [str(tmp_path / p) for p in ("a/broken.png", "a/x.png", "a/y.jpg",
                                                                             "a/y.png", "b/phone.jpg", "b/x.png")]
    assert [r["image_id"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert "error" in records[0] and "overlay" not in records[0]
    assert records[1]["overlay"] == "a/x.png_pred.png" and records[1]["detections"] >= 0
    predictions = json.loads((pred / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} <= {2, 3, 4, 5, 6}


def test_predict_fails_only_when_no_image_could_be_read(tiny_run, tmp_path, capsys):
    out = tiny_run
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 cut short")
    capsys.readouterr()
    assert main(["predict", str(out / "last.pt"), str(tmp_path / "broken.jpg"), "--out", str(tmp_path / "pred")]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"maskrcnn: warning: skipped {tmp_path / 'broken.jpg'}: cannot decode image")
    assert error.startswith("maskrcnn: error: none of the 1 image(s) could be read") and "images.json" in error
    assert "cannot decode image" in json.loads((tmp_path / "pred" / "images.json").read_text())[0]["error"]


def write_coco(folder: Path, categories: list[dict]) -> Path:
    """Four 64x96 (landscape) / 96x64 (portrait) images with one rectangle each, classes alternating over
    `categories`; image ids 101..104 and category ids as given, so that neither equals a running number or a
    label."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(4):
        height, width = (64, 96) if i % 2 == 0 else (96, 64)
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[8:28, 10:34] = (200, 60 * i, 30)
        Image.fromarray(pixels).save(folder / "images" / f"im{i}.png")
        images.append({"id": 101 + i, "file_name": f"im{i}.png", "height": height, "width": width})
        annotations.append({"id": 1 + i, "image_id": 101 + i, "category_id": categories[i % len(categories)]["id"],
                            "bbox": [10, 8, 24, 20], "iscrowd": 0, "segmentation": [[10, 8, 34, 8, 34, 28, 10, 28]]})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def tiny_sections(tiny_values: dict) -> dict:
    """The tiny config's model / train / eval sections (a copy: the fixture is shared) with num_classes left to
    the data."""
    sections = copy.deepcopy({key: tiny_values[key] for key in ("model", "train", "eval")})
    del sections["model"]["num_classes"]
    return sections


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory, tiny_values):
    """`maskrcnn train coco` on a tiny COCO json with category ids 7 (cat) and 3 (dog), model.num_classes unset."""
    root = tmp_path_factory.mktemp("coco")
    instances = write_coco(root, [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}])
    sections = tiny_sections(tiny_values)
    overrides = flat_overrides(sections) + [
        "model.backbone.weights=none", "model.box_head.score_thresh=0.0", "train.max_iters=2", "data.num_workers=0",
        f"data.train_images={root / 'images'}", f"data.train_annotations={instances}",
        f"data.val_images={root / 'images'}", f"data.val_annotations={instances}"]
    argv = ["train", "coco", "--out", str(root / "run")]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 0
    return root, argv


def test_train_coco_by_name_takes_the_classes_from_the_json(coco_run):
    import torch

    root, _ = coco_run
    state = torch.load(root / "run" / "last.pt", map_location="cpu", weights_only=False)
    # labels 1..K follow the sorted category ids: 1 = id 3 (dog), 2 = id 7 (cat)
    assert state["categories"] == [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}]
    assert state["config"]["model"]["num_classes"] == 2
    detections = json.loads((root / "run" / "detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {3, 7}
    assert {d["image_id"] for d in detections} <= {101, 102, 103, 104}
    assert "dog" in (root / "run" / "report.md").read_text()


def test_predict_writes_the_jsons_image_and_category_ids(coco_run, tmp_path):
    root, _ = coco_run
    out = tmp_path / "pred"
    assert main(["predict", str(root / "run" / "last.pt"), str(root / "images"), "--out", str(out),
                 "--score-thresh", "0.0", "--annotations", str(root / "instances.json")]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= {3, 7}
    ids = {Path(p["file_name"]).name: p["image_id"] for p in predictions}
    assert all(ids[f"im{i}.png"] == 101 + i for i in range(4) if f"im{i}.png" in ids)
    # without the json: numbered images, still the training data's category ids
    assert main(["predict", str(root / "run" / "last.pt"), str(root / "images"), "--out", str(out),
                 "--score-thresh", "0.0"]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert {p["category_id"] for p in predictions} <= {3, 7} and {p["image_id"] for p in predictions} <= {1, 2, 3, 4}


def test_class_mismatches_are_one_line_errors_naming_both(coco_run, tmp_path, capsys):
    root, train_argv = coco_run
    other = write_coco(tmp_path, [{"id": 1, "name": "car"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "cow"}])
    checkpoint = str(root / "run" / "last.pt")
    capsys.readouterr()
    assert main(["evaluate", checkpoint, "--set", f"data.val_annotations={other}", "--set",
                 f"data.val_images={tmp_path / 'images'}"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "last.pt was trained on 2 classes (dog, cat)" in err and f"{other} has 3 classes (car, dog, cow)" in err
    assert main(["predict", checkpoint, str(tmp_path / "images"), "--out", str(tmp_path / "p"),
                 "--annotations", str(other)]) != 0
    assert "was trained on 2 classes (dog, cat)" in capsys.readouterr().err
    assert main([*train_argv, "--set", "model.num_classes=3", "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.num_classes is 3 but the training data" in err and "have 2 classes (dog, cat)" in err
    assert main([*train_argv, "--set", f"data.val_annotations={other}", "--out", str(tmp_path / "r")]) != 0
    assert "have 3 classes (car, dog, cow) but the training data" in capsys.readouterr().err


def test_unknown_config_names_the_presets(capsys):
    assert main(["train", "no-such-preset"]) != 0
    err = capsys.readouterr().err
    assert "no-such-preset is neither a file nor a preset" in err and "pennfudan" in err and "seed" in err


def test_seed_task_from_a_coco_json_with_portrait_and_landscape_images(tmp_path, tiny_values, capsys):
    """The original project's task end to end: `data coco-subset`, then `train seed` on its fixed canvas, here
    scaled down to 64x96 (landscape images fill it, portrait ones need it turned); the report then shows the
    original project's row."""
    instances = write_coco(tmp_path, [{"id": 1, "name": "person", "supercategory": "person"},
                                      {"id": 3, "name": "car", "supercategory": "vehicle"},
                                      {"id": 18, "name": "dog", "supercategory": "animal"}])
    assert main(["data", "coco-subset", str(instances), str(tmp_path / "subset.json")]) == 0
    sections = tiny_sections(tiny_values)
    overrides = flat_overrides(sections) + [
        "model.backbone.weights=none", "model.transform.min_size=64", "model.transform.max_size=96",
        "model.transform.fixed_canvas=[64, 96]", "train.max_iters=2",
        f"data.train_images={tmp_path / 'images'}", f"data.train_annotations={tmp_path / 'subset.json'}",
        f"data.val_images={tmp_path / 'images'}", f"data.val_annotations={tmp_path / 'subset.json'}"]
    argv = ["train", "seed", "--out", str(tmp_path / "run")]
    for override in overrides:
        argv += ["--set", override]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    assert load_config(tmp_path / "run" / "config.yaml").model.transform.fixed_canvas == (64, 96)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| original project (BoxHead) |" in report and "| vehicles |" in report


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 5120000000 bytes."),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_running_out_of_memory_is_one_line_that_says_what_to_change(error):
    from maskrcnn.cli import describe_error

    line, status = describe_error(error)
    assert status == 2 and "\n" not in line
    assert line.startswith("maskrcnn: error: out of memory") and "--tile" in line and "detections_per_img" in line


def test_another_runtime_error_is_a_bug():
    from maskrcnn.cli import describe_error

    line, status = describe_error(RuntimeError("shape mismatch"))
    assert status == 1 and line.startswith("maskrcnn: internal error: RuntimeError: shape mismatch")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--minutes", "nan"], "'nan': must be a finite number"),
    (["demo", "--minutes", "inf"], "'inf': must be a finite number"),
    (["demo", "--minutes", "-1"], "'-1': must be above 0"),
    (["predict", "a.pt", "x.png", "--out", "o", "--score-thresh", "nan"], "'nan': must be a finite number"),
    (["predict", "a.pt", "x.png", "--out", "o", "--score-thresh", "1.5"], "must be between 0 and 1"),
    (["predict", "a.pt", "x.png", "--out", "o", "--score-thresh", "half"], "'half': not a number"),
])
def test_numbers_on_the_command_line_are_checked_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
