"""Fixtures: small data sets written by the tests themselves, in the real formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datafiles import coco_dict, write_image


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    """tmp_path with images/ (a.png, sub/b.png, c.png) and instances.json from `coco_dict`."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    write_image(images / "a.png", 20, 30, "RGB", seed=1)
    write_image(images / "sub" / "b.png", 16, 16, "L", seed=2)
    write_image(images / "c.png", 10, 12, "RGBA", seed=3)
    (tmp_path / "instances.json").write_text(json.dumps(coco_dict()))
    return tmp_path

