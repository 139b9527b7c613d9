import dataclasses
from pathlib import Path

import pytest
import yaml

from maskrcnn.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
)


def _all_dataclass_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        yield f"{prefix}{f.name}", f
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _all_dataclass_fields(type(default), f"{prefix}{f.name}.")


def test_every_field_has_a_comment():
    import inspect

    import maskrcnn.config as module

    source = inspect.getsource(module)
    for name, _ in _all_dataclass_fields(Config):
        leaf = name.rsplit(".", 1)[-1]
        lines = [line for line in source.splitlines() if line.strip().startswith(f"{leaf}:")]
        assert lines and all("#" in line for line in lines), f"config field {name} has no comment"


def test_defaults_are_torchvisions():
    config = load_config()
    assert config.model.rpn.pre_nms_top_n_train == 2000 and config.model.rpn.post_nms_top_n_test == 1000
    assert config.model.box_head.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0)
    assert config.model.transform.min_size == 800 and config.model.transform.max_size == 1333


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.1, "steps": [10, 20]}, "model": {"num_classes": 1}}))
    config = load_config(path, ["train.lr=0.01", "model.transform.fixed_canvas=[800, 1088]", "train.clip_grad_norm=null"])
    assert config.train.lr == 0.01
    assert config.train.steps == (10, 20)
    assert config.model.num_classes == 1
    assert config.model.transform.fixed_canvas == (800, 1088)
    assert config.train.clip_grad_norm is None


def test_paths_are_relative_to_their_yaml_file_and_overrides_to_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"format": "coco", "train_images": "../data/train", "train_annotations": "/abs/train.json",
                 "val_images": "~/val", "root": ""},
        "model": {"weights": "none", "backbone": {"weights": "weights/resnet.pt"}},
        "train": {"out_dir": "runs/mine"},
    }))
    monkeypatch.chdir(tmp_path)
    config = load_config("project/configs/mine.yaml", ["data.val_annotations=val.json"])
    assert config.data.train_images == str(folder / "../data/train")  # the file's folder, not the working one
    assert config.data.train_annotations == "/abs/train.json"
    assert config.data.val_images == str(Path("~/val").expanduser())
    assert config.data.val_annotations == str(tmp_path / "val.json")  # typed on the command line: the working dir
    assert config.model.backbone.weights == str(folder / "weights/resnet.pt")
    assert (config.data.root, config.model.weights) == ("", "none")  # words, not paths
    assert config.train.out_dir == "runs/mine"  # where the run goes stays relative to where it is started
    save_config(config, tmp_path / "saved.yaml")  # a run's config.yaml: the same paths from anywhere
    assert load_config(tmp_path / "saved.yaml").data == config.data


def test_int_is_accepted_where_a_float_is_expected():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=0.1", "train.lrr"),
        ("model.backbone.dept=50", "model.backbone.dept"),
        ("train.max_iters=1.5", "train.max_iters"),
        ("train.max_iters=true", "train.max_iters"),
        ("train.amp=1", "train.amp"),
        ("model.transform.fixed_canvas=[800]", "model.transform.fixed_canvas"),
        ("model.backbone.depth=42", "model.backbone.depth"),
        ("data.format=kitti", "data.format"),
        ("train.lr=null", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("model=3", "model"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..lr=1")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian: {lr: 1}\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*'trian'"):
        load_config(unknown)


def test_round_trip(tmp_path):
    config = load_config(None, ["model.transform.fixed_canvas=[64, 96]", "train.steps=[5]"])
    path = tmp_path / "saved.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert config_from_dict(config_to_dict(config)) == config


def test_config_is_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0


def test_exponent_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-4 as a string; every user means the number."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 5E-5\n  gamma: +1e0\n")
    config = load_config(path, ["train.warmup_factor=1e-3"])
    assert (config.train.lr, config.train.weight_decay, config.train.gamma) == (1e-4, 5e-5, 1.0)
    assert config.train.warmup_factor == 1e-3
    assert load_config(None, ["train.out_dir=1e5x"]).train.out_dir == "1e5x"  # not a number: stays a string


def test_every_range_rule_names_a_config_key():
    from maskrcnn.config import _RANGES, _lookup

    for key in _RANGES:
        _lookup(Config(), key)  # AttributeError if a field was renamed without its rule


def test_aliases_within_the_bounds_are_fine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rpn:\n    anchor_sizes: &sizes [8, 16, 32, 64, 128]\n"
                    "train:\n  steps: [100, 200]\n  max_iters: 300\n")
    assert load_config(path).model.rpn.anchor_sizes == (8, 16, 32, 64, 128)
