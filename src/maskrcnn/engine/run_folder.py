"""The files of a run folder, named once for training, the demo, evaluation and the report (no other module
spells them), and the rule of what a new run or evaluation may replace there.

A training run's folder:
    config.yaml     the full config of the run
    metrics.jsonl   one JSON record per log period, {"iteration", "lr", "loss", "loss_*", "time"} with the losses
                    averaged over the period, and one per evaluation, {"iteration", "eval": {...metrics}}
    last.pt         checkpoint every checkpoint_period iterations, before every evaluation, at the end and when a
                    signal stops the run; best.pt: the weights of the best mask AP so far
    log.txt         the progress lines; tb/: TensorBoard scalars (train.tensorboard)
    metrics.json    the last evaluation, with detections.json and pr_curves.json; report.md / report.html,
                    figures/, browse_val.html and browse_val/: its report

Paths only: no torch, so that a folder is checked before anything heavy loads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from maskrcnn.errors import UserError

# What a training run writes that a new run in the same folder would replace or truncate (RunFolder's names).
TRAINING_OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl")
# What an evaluation writes (a training run ends with one): replaced only when asked.
EVALUATION_OUTPUTS = ("metrics.json", "detections.json", "pr_curves.json", "report.md", "report.html", "figures",
                      "browse_val.html", "browse_val")


@dataclass(frozen=True)
class RunFolder:
    """A run folder: `path` and the files in it, by name."""

    path: Path  # the folder (train.out_dir, or an evaluation's --out)

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        """config.yaml: the whole config of the run, paths absolute."""
        return self.path / "config.yaml"

    @property
    def metrics_jsonl(self) -> Path:
        """metrics.jsonl: one JSON record per logged iteration and per evaluation."""
        return self.path / "metrics.jsonl"

    @property
    def last(self) -> Path:
        """last.pt: the latest checkpoint, with the optimiser and schedule to resume from."""
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        """best.pt: the checkpoint of the best mask AP so far."""
        return self.path / "best.pt"

    @property
    def log(self) -> Path:
        """log.txt: the progress lines of the run."""
        return self.path / "log.txt"

    @property
    def tensorboard(self) -> Path:
        """tb/: TensorBoard event files (train.tensorboard)."""
        return self.path / "tb"

    @property
    def metrics(self) -> Path:
        """metrics.json: the last evaluation's metrics."""
        return self.path / "metrics.json"

    @property
    def detections(self) -> Path:
        """detections.json: the last evaluation's detections as COCO results."""
        return self.path / "detections.json"

    @property
    def pr_curves(self) -> Path:
        """pr_curves.json: the last evaluation's precision-recall curves per class."""
        return self.path / "pr_curves.json"

    @property
    def report_md(self) -> Path:
        """report.md: the report of the last evaluation."""
        return self.path / "report.md"

    @property
    def report_html(self) -> Path:
        """report.html: the same report, pictures inline."""
        return self.path / "report.html"

    def browse_page(self, image_set: str = "val") -> Path:
        """browse_<image_set>.html: the browsable page of the pictured images (its pictures in browse_<image_set>/)."""
        return self.path / f"browse_{image_set}.html"

    @property
    def figures(self) -> Path:
        """figures/: the report's PNGs."""
        return self.path / "figures"

    def _first_existing(self, names: tuple[str, ...]) -> Path | None:
        return next((self.path / name for name in names if (self.path / name).exists()), None)

    def earlier_run(self) -> Path | None:
        """The first file of an earlier training run here (what a new run would replace or truncate), or None."""
        return self._first_existing(TRAINING_OUTPUTS)

    def check_new_run(self, *, resume: bool, overwrite: bool) -> None:
        """A folder that holds an earlier run is trained into only to continue it (`resume`) or replace it
        (`overwrite`).

        Raises:
            UserError: it holds an earlier run and neither is given; names its file and the ways out.
        """
        earlier = self.earlier_run()
        if earlier is not None and not (resume or overwrite):
            raise UserError(f"{earlier} is from an earlier run; pass --resume to continue it, --overwrite to replace "
                            f"it, or choose another --out")

    def check_new_evaluation(self, *, overwrite: bool) -> None:
        """An evaluation replaces the metrics and report already here only with `overwrite` (the folder may be a
        training run's).

        Raises:
            UserError: one of EVALUATION_OUTPUTS exists and not `overwrite`; names it.
        """
        existing = self._first_existing(EVALUATION_OUTPUTS)
        if existing is not None and not overwrite:
            raise UserError(f"{existing} exists (from a training run or an earlier evaluation); pass --overwrite to "
                            f"replace it or choose another --out")

    def first_free(self) -> RunFolder:
        """This folder, or the first of <path>-2, <path>-3, ... that holds no earlier run."""
        candidates = itertools.chain([self.path], (self.path.with_name(f"{self.path.name}-{n}")
                                                   for n in itertools.count(2)))
        return next(folder for folder in map(RunFolder, candidates) if folder.earlier_run() is None)
