"""`maskrcnn data coco-subset` and `maskrcnn data pennfudan`: data sets made ready for training."""

from __future__ import annotations

import json
from pathlib import Path

from maskrcnn.data import build_coco_subset, fetch_pennfudan


def coco_subset(instances_json: str | Path, out_json: str | Path) -> str:
    """Writes the original project's 3-class subset of a COCO instances json; returns its summary to print."""
    summary = build_coco_subset(instances_json, out_json)
    return (json.dumps(summary, indent=2) + "\n" if summary else "") + f"wrote {out_json}"


def pennfudan(folder: str | Path, *, source: str | Path | None) -> str:
    """Puts Penn-Fudan into `folder` (from `source`, a zip or folder, or its official address); what to print."""
    return f"Penn-Fudan ready at {fetch_pennfudan(folder, source=source)}"
