"""The jobs the command line runs end to end: a training run (the demo's included) with its evaluation and
report, and the evaluation of a checkpoint with its report. They return what happened and the lines to print;
the command line prints them.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

from maskrcnn.config import Config, check_config, config_path, load_config, preset_path
from maskrcnn.data import build_dataset, data_source, dataset_categories, with_num_classes
from maskrcnn.engine import distributed
from maskrcnn.engine.checkpoint import check_categories, load_model
from maskrcnn.engine.common import cuda_autocast
from maskrcnn.engine.evaluate import EvalResult, evaluate_dataset
from maskrcnn.engine.run_folder import RunFolder
from maskrcnn.engine.train import TrainResult, train
from maskrcnn.fileio import full_disk_as_error
from maskrcnn.viz.report import build_report, format_metric


@dataclass
class Reported:
    """An evaluation and the report written from it (no report on the ranks other than 0, or after a stop)."""

    evaluation: EvalResult | None
    report_md: Path | None
    report_html: Path | None
    minutes: float  # wall time of the whole job


@dataclass
class TrainOutcome:
    """What a training job ended with, for the command line."""

    status: int  # exit status: 0, or 128 + the signal's number when SIGINT / SIGTERM stopped the training
    lines: list[str]  # for stdout
    warnings: list[str]  # for stderr


def with_out_dir(cfg: Config, out: str | Path | None) -> Config:
    """`cfg` with train.out_dir set from --out, checked as the config file's value is (an existing file is
    refused)."""
    return cfg if out is None else check_config(replace(cfg, train=replace(cfg.train, out_dir=str(out))))


def demo_config(overrides: list[str], *, out: str | Path | None, minutes: float | None, overwrite: bool) -> Config:
    """The demo preset with the overrides; without --out a second demo keeps the first one's run (runs/demo-2)."""
    cfg = load_config(preset_path("demo"), overrides)
    if out is None and not overwrite:
        cfg = with_out_dir(cfg, RunFolder(cfg.train.out_dir).first_free().path)
    cfg = with_out_dir(cfg, out)
    return cfg if minutes is None else replace(cfg, train=replace(cfg.train, max_minutes=minutes))


def train_config(config: str | Path, overrides: list[str], *, out: str | Path | None) -> tuple[Config, str]:
    """(the config of a preset name or YAML file with the overrides and --out, its name for the report's title)."""
    path = config_path(config)
    return with_out_dir(load_config(path, overrides), out), path.stem


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
    result = train(cfg, train_set=train_set, val_set=val_set, resume=resume, overwrite=overwrite)
    md = html = None
    if result.interrupted_by is None and distributed.is_main():
        with full_disk_as_error(result.out_dir):
            md, html = build_report(result.out_dir, config=cfg, evaluation=result.evaluation, title=title)
    return result, Reported(result.evaluation, md, html, (time.perf_counter() - started) / 60)


def run_training(cfg: Config, *, resume: bool, overwrite: bool, title: str) -> TrainOutcome:
    """`train_and_report`, and what to print: where everything is, or how to continue a stopped run."""
    result, reported = train_and_report(cfg, resume=resume, overwrite=overwrite, title=title)
    run = RunFolder(result.out_dir)
    if result.interrupted_by is not None:
        warnings = [f"stopped by {result.interrupted_by} after iteration {result.iterations}; saved {run.last}. "
                    f"Continue with: maskrcnn train {run.config} --resume"] if distributed.is_main() else []
        return TrainOutcome(128 + signal.Signals[result.interrupted_by].value, [], warnings)
    if not distributed.is_main():
        return TrainOutcome(0, [], [])
    voc = result.evaluation.metrics["voc"]
    budget = " (stopped by the time budget)" if result.stopped_early else ""
    return TrainOutcome(0, [
        f"trained {result.iterations} iterations{budget}, {reported.minutes:.1f} minutes with evaluation and report",
        metrics_table(result.evaluation.metrics),
        f"mask mAP@{voc['iou_thresh']:g} (original metric): {format_metric(voc['segm']['mAP'])}",
        f"report: {reported.report_html}\n        {reported.report_md}"], [])


def metrics_table(metrics: dict) -> str:
    """COCO AP, AP50, AP75 and the original project's mAP of boxes and masks, as a small table."""
    voc = metrics["voc"]
    lines = [f"{'':6} {'AP':>6} {'AP50':>6} {'AP75':>6} {'mAP@' + format(voc['iou_thresh'], 'g'):>8}"]
    for label, kind in (("boxes", "bbox"), ("masks", "segm")):
        stats = metrics[kind]
        lines.append(f"{label:6} {format_metric(stats['AP']):>6} {format_metric(stats['AP50']):>6} "
                     f"{format_metric(stats['AP75']):>6} {format_metric(voc[kind]['mAP']):>8}")
    return "\n".join(lines)


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
                                  max_images=cfg.eval.max_images, amp=cuda_autocast(cfg.model.precision), out_dir=out.path,
                                  num_vis=cfg.eval.num_vis, mask_ceiling=cfg.eval.mask_ceiling)
        md, html = build_report(out.path, config=cfg, evaluation=result,
                                metrics_jsonl=RunFolder(checkpoint.parent).metrics_jsonl,
                                title=f"Evaluation of {checkpoint}")
    return Reported(result, md, html, (time.perf_counter() - started) / 60)


def run_evaluation(checkpoint: str | Path, out: str | Path | None, *, data_config: str | Path | None,
                   overrides: list[str], overwrite: bool) -> list[str]:
    """`evaluate_checkpoint` into `out` (default: eval_<name> beside the checkpoint); the lines to print."""
    checkpoint = Path(checkpoint)
    out = Path(out or checkpoint.parent / f"eval_{checkpoint.stem}")
    reported = evaluate_checkpoint(checkpoint, out, data_config=data_config, overrides=overrides,
                                   overwrite=overwrite)
    return [metrics_table(reported.evaluation.metrics), f"metrics: {RunFolder(out).metrics}",
            f"report: {reported.report_html}\n        {reported.report_md}"]
