"""The jobs the command line runs end to end: a training run with its evaluation and report, and the evaluation of
a checkpoint with its report. They return what happened; the command line prints it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from maskrcnn.config import Config
from maskrcnn.data import build_dataset, data_source, dataset_categories, with_num_classes
from maskrcnn.engine import distributed
from maskrcnn.engine.checkpoint import check_categories, load_model
from maskrcnn.engine.evaluate import EvalResult, evaluate_dataset
from maskrcnn.engine.run_folder import RunFolder
from maskrcnn.engine.train import TrainResult, train
from maskrcnn.fileio import full_disk_as_error
from maskrcnn.viz.report import build_report


@dataclass
class Reported:
    """An evaluation and the report written from it (no report on the ranks other than 0, or after a stop)."""

    evaluation: EvalResult | None
    report_md: Path | None
    report_html: Path | None
    minutes: float  # wall time of the whole job


def train_and_report(cfg: Config, *, resume: bool, overwrite: bool, title: str) -> tuple[TrainResult, Reported]:
    """Trains `cfg` (its data sets built first, the class count taken from them when unset), evaluates, and on
    rank 0 writes the report into the run folder, unless a signal stopped the training.

    A folder that holds an earlier run is trained into only with `resume` (continue it) or `overwrite` (replace
    it): a new run would truncate its metrics.jsonl and replace its checkpoints.

    Raises:
        UserError: an earlier run without `resume` / `overwrite`, or whatever the config, data and training find.
    """
    RunFolder(cfg.train.out_dir).check_new_run(resume=resume, overwrite=overwrite)
    started = time.perf_counter()
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    cfg = with_num_classes(cfg, train_set, val_set)
    result = train(cfg, train_set=train_set, val_set=val_set, resume=resume)
    md = html = None
    if result.interrupted_by is None and distributed.is_main():
        with full_disk_as_error(result.out_dir):
            md, html = build_report(result.out_dir, config=cfg, evaluation=result.evaluation, title=title)
    return result, Reported(result.evaluation, md, html, (time.perf_counter() - started) / 60)


def evaluate_checkpoint(checkpoint: str | Path, out: str | Path, *, data_config: str | Path | None,
                        overrides: list[str], overwrite: bool) -> Reported:
    """Evaluates a checkpoint on the validation split of its data (or of `data_config`, a file or preset) and
    writes metrics.json, detections.json, pr_curves.json and the report into `out`.

    Raises:
        UserError: `out` holds an earlier evaluation and not `overwrite`; the checkpoint, config or data are bad;
            the data's classes are not the checkpoint's.
    """
    started = time.perf_counter()
    checkpoint, out = Path(checkpoint), RunFolder(out)
    out.check_new_evaluation(overwrite=overwrite)
    loaded = load_model(checkpoint, data_config=data_config, overrides=overrides)
    cfg = loaded.config
    dataset = build_dataset(cfg.data, "val")
    check_categories(checkpoint, loaded.categories, data_source(cfg.data, "val"), dataset_categories(dataset))
    with full_disk_as_error(out.path):
        result = evaluate_dataset(loaded.model, dataset, batch_size=cfg.eval.batch_size, device=loaded.device,
                                  num_workers=cfg.data.num_workers, iou_thresh=cfg.eval.iou_thresh,
                                  max_images=cfg.eval.max_images, amp=cfg.train.amp, out_dir=out.path,
                                  num_vis=cfg.eval.num_vis, mask_ceiling=cfg.eval.mask_ceiling)
        md, html = build_report(out.path, config=cfg, evaluation=result,
                                metrics_jsonl=RunFolder(checkpoint.parent).metrics_jsonl,
                                title=f"Evaluation of {checkpoint}")
    return Reported(result, md, html, (time.perf_counter() - started) / 60)
