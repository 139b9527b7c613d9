"""Loss curves and precision-recall curves as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from maskrcnn.fileio import read_jsonl  # noqa: E402

# One figure per stage of the network, in the order of the original README; each panel is one loss term.
LOSS_FIGURES = {
    "loss_rpn": ("RPN", {"loss_rpn_cls": "classifier (objectness)", "loss_rpn_box": "regressor (box deltas)"}),
    "loss_box_head": ("BoxHead", {"loss_box_cls": "classifier", "loss_box_reg": "regressor"}),
    "loss_mask_head": ("MaskHead", {"loss_mask": "mask (binary cross-entropy)"}),
    "loss_total": ("Total", {"loss": "sum of all terms"}),
}


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """Training records (those with losses) from a metrics.jsonl, in file order; evaluation records and a last line
    torn by a kill are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    return [record for record in read_jsonl(path) if "loss" in record]


def plot_loss_curves(records: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """One PNG per stage (RPN, BoxHead, MaskHead, total), one panel per loss term present in the records.

    Args:
        records: training records {"iteration", "loss", "loss_*", ...}.
        out_dir: folder of the PNGs.
    Returns:
        figure name (a key of LOSS_FIGURES) -> path, only for stages with at least one term present.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    iterations = [record["iteration"] for record in records]
    paths = {}
    for name, (stage, terms) in LOSS_FIGURES.items():
        present = {key: title for key, title in terms.items() if records and all(key in r for r in records)}
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.5), squeeze=False)
        for ax, (key, title) in zip(axes[0], present.items()):
            ax.plot(iterations, [record[key] for record in records], linewidth=1.2)
            ax.set_title(f"{stage} {title}")
            ax.set_xlabel("iteration")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name], dpi=100)
        plt.close(fig)
    return paths


def plot_pr_curves(curves: dict[str, dict], path: str | Path, *, title: str) -> Path:
    """Precision-recall curve of every class, its AP in the legend.

    Args:
        curves: class name -> {"precision": [...], "recall": [...], "ap": float | None}.
        path: PNG to write.
        title: figure title.
    Returns:
        path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, curve in curves.items():
        if curve["ap"] is None:
            ax.plot([], [], label=f"{name} (no ground truth)")
            continue
        # Start the curve at recall 0 with the first precision so that a one-point curve is still visible.
        recall = [0.0] + list(curve["recall"])
        precision = ([curve["precision"][0]] if curve["precision"] else [0.0]) + list(curve["precision"])
        ax.plot(recall, precision, drawstyle="steps-post", label=f"{name} (AP {curve['ap']:.3f})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_error_breakdown(errors: dict[str, dict], path: str | Path, *, names: dict[str, str]) -> Path:
    """The AP each error type would add back if fixed (TIDE's dAP), boxes and masks side by side.

    Args:
        errors: {"bbox" | "segm": {"dap": {error type: dAP}, ...}} (metrics["errors"]).
        path: PNG to write.
        names: error type -> the name printed.
    Returns:
        path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    types = list(errors["bbox"]["dap"])
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    height = 0.38
    for offset, (kind, label) in zip((-height / 2, height / 2), (("bbox", "boxes"), ("segm", "masks"))):
        values = [errors[kind]["dap"][t] for t in types]
        bars = ax.barh([i + offset for i in range(len(types))], values, height=height, label=label)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=8)
    ax.set_yticks(range(len(types)), [names[t] for t in types])
    ax.invert_yaxis()  # TIDE's order from the top
    ax.set_xlabel("AP@0.5 added back if fixed (dAP)")
    ax.set_xlim(0, max(0.05, 1.25 * max(max(errors[k]["dap"].values()) for k in ("bbox", "segm"))))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: dict, path: str | Path, *, title: str) -> Path:
    """A confusion matrix as a heat map with its counts; rows the ground truth, columns the predictions.

    Args:
        confusion: {"classes": K names + "background", "matrix": (K+1) x (K+1) counts}.
        path: PNG to write.
        title: figure title.
    Returns:
        path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    classes, matrix = confusion["classes"], confusion["matrix"]
    side = min(12.0, 2.5 + 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if len(classes) <= 25:  # counts stay legible up to about this many classes
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > peak / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
