"""One report per run, `report.md` and `report.html` with PNG figures, in the order of the original project's
README: RPN (loss curves, proposals), BoxHead (loss curves, detections), MaskHead (loss curve, masks),
precision-recall curves; then the metrics (COCO AP next to the original per-class AP@0.5 and its mAP), why the
model is wrong (TIDE's error types and what fixing each would add back, AP by object size, the masks against what
their boxes allow, confusion matrices, the worst images with every error marked) and the config; and a browsable
page of the pictured images (`viz/browse.py`). Everything is drawn from what evaluation returned (`EvalResult`,
its `pictures` and `views` included): no model runs here."""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from pycocotools import mask as mask_utils
from torch import Tensor

from maskrcnn.config import Config, config_to_dict
from maskrcnn.engine.analysis import ERROR_NAMES, ERROR_TYPES, SIZE_RANGES
from maskrcnn.engine.coco_results import COCO_STAT_NAMES
from maskrcnn.engine.evaluate import EvalResult
from maskrcnn.engine.inference import Picture
from maskrcnn.engine.run_folder import RunFolder
from maskrcnn.engine.views import ImageView
from maskrcnn.fileio import write_text_atomic
from maskrcnn.viz.browse import write_browse_page
from maskrcnn.viz.draw import (
    KIND_COLORS,
    class_colors,
    draw_detections,
    draw_marked,
    draw_masks,
    draw_proposals,
    save_png,
    side_by_side,
)
from maskrcnn.viz.plots import (
    plot_confusion,
    plot_error_breakdown,
    plot_loss_curves,
    plot_pr_curves,
    read_metrics_jsonl,
)

log = logging.getLogger(__name__)
MIN_PICTURE_SIDE = 384  # smaller images (e.g. the 128 px synthetic ones) are enlarged so that labels stay readable
ORIGINAL_BOX_MAP = 0.503  # the original project's BoxHead mAP (per-class AP at IoU 0.5, 3 classes; docs/ARCHITECTURE.md)
ORIGINAL_CLASSES = ["vehicles", "people", "animals"]  # its task; `maskrcnn data coco-subset` writes the same classes
STAGE_PICTURES = 2  # the first pictured images are also drawn per stage (RPN, BoxHead, MaskHead)


@dataclass
class Section:
    """A report section: a title, paragraphs of text, tables (header + rows) and figures (caption, path)."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    code: str | None = None
    links: list[tuple[str, Path]] = field(default_factory=list)


def enlarge(image: Tensor, items: dict, factor: int) -> tuple[Tensor, dict]:
    """Scales an image and its boxes / masks / proposals by an integer factor (nearest neighbour: pixels stay
    crisp). Args: image uint8 [3, H, W]; items with any of "boxes" / "proposals" f32[D, 4], "masks" [D, H, W]
    or [D, 1, H, W]. Returns the enlarged image and a copy of items."""
    if factor == 1:
        return image, items
    big = image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)  # (3, H, W) -> (3, fH, fW)
    items = dict(items)
    for key in ("boxes", "proposals"):
        if key in items:
            items[key] = items[key] * factor
    if "masks" in items:
        items["masks"] = items["masks"].repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return big, items


def format_metric(value: float | None) -> str:
    """A metric as the report and the command line print it: 3 decimals, "n/a" where it does not exist."""
    return "n/a" if value is None else f"{value:.3f}"


def render_stage_pictures(
    pictures: list[Picture],
    out_dir: str | Path,
    *,
    class_names: list[str],
    score_thresh: float,
    top_proposals: int,
) -> dict[str, list[Path]]:
    """Per-stage pictures of the images evaluation kept (`EvalResult.pictures`); runs no model.

    Each picture shows the ground truth on the left and the stage's output on the right: RPN the top proposals
    (when the evaluated model returned them), BoxHead the final boxes with class name and score, MaskHead the
    masks in class colours.

    Args:
        pictures: images, targets and outputs from `evaluate(..., num_vis=n)`.
        out_dir: folder of the PNGs.
        class_names: K foreground names; label k is class_names[k-1].
        score_thresh: detections drawn score at least this.
        top_proposals: proposals drawn in the RPN picture.
    Returns:
        {"rpn": [paths], "box_head": [paths], "mask_head": [paths]}.
    """
    out_dir = Path(out_dir)
    paths: dict[str, list[Path]] = {"rpn": [], "box_head": [], "mask_head": []}
    for i, picture in enumerate(pictures):
        image, output = picture.image, picture.output
        factor = max(1, math.ceil(MIN_PICTURE_SIDE / min(image.shape[-2:])))
        _, target = enlarge(image, picture.target, factor)
        image, output = enlarge(image, output, factor)
        truth = draw_detections(image, target["boxes"], target["labels"], None, class_names=class_names,
                                masks=target["masks"])
        if "proposals" in output:
            rpn = draw_proposals(image, output["proposals"], top_n=top_proposals)
            paths["rpn"].append(save_png(side_by_side([truth, rpn]), out_dir / f"rpn_{i}.png"))
        boxes = draw_detections(image, output["boxes"], output["labels"], output["scores"], class_names=class_names,
                                score_thresh=score_thresh)
        masks = draw_masks(image, output["masks"], output["labels"], output["scores"], class_names=class_names,
                           score_thresh=score_thresh)
        paths["box_head"].append(save_png(side_by_side([truth, boxes]), out_dir / f"box_head_{i}.png"))
        paths["mask_head"].append(save_png(side_by_side([truth, masks]), out_dir / f"mask_head_{i}.png"))
    return paths


def metrics_sections(metrics: dict) -> list[Section]:
    """The metrics table (COCO AP and the original mAP, boxes and masks) and the per-class AP@0.5 table."""
    voc = metrics["voc"]
    iou = voc["iou_thresh"]
    header = ["", *COCO_STAT_NAMES, f"mAP@{iou:g} (original metric)"]
    rows = [
        [label, *(format_metric(metrics[kind][name]) for name in COCO_STAT_NAMES), format_metric(voc[kind]["mAP"])]
        for label, kind in (("boxes", "bbox"), ("masks", "segm"))
    ]
    original_task = list(voc["bbox"]["per_class"]) == ORIGINAL_CLASSES
    if original_task:  # a reference for the same classes only; on other data the number would mislead
        rows.append(["original project (BoxHead)", *(["-"] * len(COCO_STAT_NAMES)), format_metric(ORIGINAL_BOX_MAP)])
    per_class_header = ["class", f"box AP@{iou:g}", f"mask AP@{iou:g}"]
    per_class_rows = [
        [name, format_metric(voc["bbox"]["per_class"][name]), format_metric(voc["segm"]["per_class"][name])]
        for name in voc["bbox"]["per_class"]
    ]
    text = [
        f"{metrics['num_images']} images, {metrics['num_detections']} detections. COCO AP averages IoU 0.5:0.95 "
        f"(pycocotools); the original project's metric is the per-class area under the precision-recall curve at "
        f"IoU {iou:g} (all-point interpolated, greedy matching by score), averaged over classes (mAP).",
    ]
    if original_task:
        text.append(f"The original project reported a BoxHead mAP of {ORIGINAL_BOX_MAP} on its own 3-class COCO "
                    f"subset (300x400 images, a random 80/20 split); the row is a reference, exact only on the same "
                    f"images.")
    return [Section("Metrics", text=text, tables=[(header, rows), (per_class_header, per_class_rows)])]


def mask_ceiling_sections(metrics: dict) -> list[Section]:
    """The model's mask AP against the masks its boxes allow (`engine/mask_ceiling.py`), with the gap that loses
    the most named; none when the evaluation did not compute it (eval.mask_ceiling: false)."""
    ceiling = metrics.get("mask_ceiling")
    if ceiling is None:
        return []
    size = ceiling["mask_size"]
    rows = [("the model's masks", metrics["segm"])]
    if "target" in ceiling:
        rows.append((f"its {size}x{size} training targets, pasted back", ceiling["target"]))
    rows.append(("the ground truth inside the box", ceiling["GT in box"]))
    stats = ("AP", "AP50", "AP75")
    table = (["each detection's mask", *(f"mask {name}" for name in stats)],
             [[label, *(format_metric(values[name]) for name in stats)] for label, values in rows])
    aps = [values["AP"] for _, values in rows]
    if any(ap is None for ap in aps):
        return [Section("Masks against their boxes", text=["No object to score the masks against."],
                        tables=[table])]
    # the mask AP each stage loses: the mask head (model -> target), the M x M resolution (target -> GT in box),
    # the boxes and scores (GT in box -> 1); with the advice for each
    stages = ([("the mask head", "it has not learned its training targets: train longer, on more instances, or "
                "raise model.mask_head.loss_weight"),
               (f"the {size}x{size} mask resolution", "model.mask_head.pooler_size sets it")]
              if "target" in ceiling else [("the masks", "against the ground truth in their boxes")])
    stages.append(("the boxes and scores", "see Errors above"))
    losses = [high - low for high, low in zip([*aps[1:], 1.0], aps)]
    worst = int(np.argmax(losses))
    method = ("Each detection keeps its box, class and score and is scored again with another mask: the training "
              "target that its box cuts from the object of its class it overlaps most (cut and pasted back as the "
              "model's own masks are), and that object's mask cleared outside the box. The step from one row to the "
              "next is what the mask head loses, then the mask resolution; what the last row misses is lost by the "
              "boxes and scores." if "target" in ceiling else
              "Each detection keeps its box, class and score and is scored again with the mask of the object of its "
              "class it overlaps most, cleared outside the box. The step between the rows is what the masks lose; "
              "what the last row misses is lost by the boxes and scores.")
    verdict = f"The largest loss of mask AP, {losses[worst]:.3f}, is at {stages[worst][0]} ({stages[worst][1]})."
    return [Section("Masks against their boxes", text=[method, verdict], tables=[table])]


def _masks(items: list[dict], height: int, width: int) -> Tensor:
    """bool [N, H, W] from the items' COCO RLE "mask"."""
    if not items:
        return torch.zeros(0, height, width, dtype=torch.bool)
    decoded = mask_utils.decode([item["mask"] for item in items])  # (H, W, N)
    return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))).bool()  # (H, W, N) -> (N, H, W)


def draw_errors(view: ImageView, *, class_names: list[str], iou_type: str, score_thresh: float) -> Tensor:
    """Ground truth left (missed objects marked "missed"), predictions scoring at least score_thresh right; a
    match or a found object in its class colour, an error in its type's colour with the type in its label.
    Returns uint8 [3, H', W'] (small images enlarged as the stage pictures)."""
    height, width = view.image.shape[-2:]
    factor = max(1, math.ceil(MIN_PICTURE_SIDE / min(height, width)))
    colors = class_colors(len(class_names))
    detections = [d for d in view.detections if d["score"] >= score_thresh]
    sides = []
    for items in (view.objects, detections):
        texts, box_colors = [], []
        for item in items:
            kind = item["kind"][iou_type]
            text = class_names[item["label"] - 1] + (f" {item['score']:.2f}" if "score" in item else "")
            fine = kind in ("tp", "near")  # a "near" object is blamed on the detection's error, marked there
            texts.append(text if fine else f"{text} · {kind}")
            box_colors.append(colors[item["label"] - 1] if fine else KIND_COLORS.get(kind, KIND_COLORS["ignored"]))
        boxes = torch.tensor([item["box"] for item in items], dtype=torch.float32).reshape(-1, 4)
        image, scaled = enlarge(view.image, {"boxes": boxes, "masks": _masks(items, height, width)}, factor)
        sides.append(draw_marked(image, scaled["boxes"], texts, box_colors, masks=scaled["masks"],
                                 mask_colors=[colors[item["label"] - 1] for item in items]))
    return side_by_side(sides)


def error_sections(evaluation: EvalResult, fig_dir: Path, *, score_thresh: float) -> list[Section]:
    """Why the model is wrong: TIDE's error breakdown (table + bar chart), AP by object size, the masks against
    their boxes, the confusion matrices and the worst images with every error marked."""
    metrics = evaluation.metrics
    errors = metrics["errors"]
    header = ["error type", "boxes dAP", "boxes count", "masks dAP", "masks count"]
    rows = [[ERROR_NAMES[t], *(cell for kind in ("bbox", "segm") for cell in
                               (format_metric(errors[kind]["dap"][t]), str(errors[kind]["counts"][t])))]
            for t in ERROR_TYPES]
    rows.append(["all false positives", format_metric(errors["bbox"]["dap_false_positives"]), "",
                 format_metric(errors["segm"]["dap_false_positives"]), ""])
    rows.append(["all false negatives", format_metric(errors["bbox"]["dap_false_negatives"]), "",
                 format_metric(errors["segm"]["dap_false_negatives"]), ""])
    rows.append(["AP@0.5 before fixing", format_metric(errors["bbox"]["ap50"]), "",
                 format_metric(errors["segm"]["ap50"]), ""])
    breakdown = Section("Errors", text=[
        "Every false positive and missed object has one type (TIDE, Bolya et al. 2020, at IoU 0.5, background "
        "below 0.1): classification (right place, wrong class), localisation (right class, IoU 0.1-0.5), both, "
        "duplicate (an object already found), background (nothing there), missed (no detection near it). dAP is "
        "the AP@0.5 that fixing every error of that type would add back; the last two rows fix all false "
        "positives (scored below every match) or all false negatives at once. Counts are of all detections, "
        "whatever their score."],
        tables=[(header, rows)],
        figures=[("AP added back by fixing each error type",
                  plot_error_breakdown(errors, fig_dir / "errors.png", names=ERROR_NAMES))])
    sizes = metrics["object_sizes"]
    size_rows = [[name, str(sizes[name]), format_metric(metrics["bbox"][stat]), format_metric(metrics["segm"][stat])]
                 for name, stat in zip(SIZE_RANGES, ("APs", "APm", "APl"))]
    by_size = Section("AP by object size", text=[
        "COCO AP (IoU 0.5:0.95) of the objects of each size: small below 32x32 pixels, medium up to 96x96, large "
        "above; n/a where there is no object of that size."],
        tables=[(["size", "objects", "box AP", "mask AP"], size_rows)])
    confusion = Section("Confusion matrix", text=[
        f"Detections scoring at least {errors['segm']['confusion']['score_thresh']:g} matched to the objects at "
        f"IoU 0.5 whatever their class: row = the object's class, column = the predicted one. The background row "
        f"counts detections on no object, the background column the objects no detection found."],
        figures=[(f"{label} confusion matrix", plot_confusion(errors[kind]["confusion"],
                                                               fig_dir / f"confusion_{kind}.png",
                                                               title=f"{label} at IoU 0.5"))
                 for kind, label in (("segm", "Masks"), ("bbox", "Boxes"))])
    gallery = Section("Worst images", text=[
        f"The images with the most missed objects, then those with the most confident false positives, by the "
        f"mask analysis. Left: the ground truth, missed objects marked; right: the predictions scoring at least "
        f"{score_thresh:g}, each box in the colour of its type (green a match) and its label naming the error."])
    for reason, ids in evaluation.worst.items():
        for rank, image_id in enumerate(ids):
            view = evaluation.views[image_id]
            if reason == "missed":
                missed = sum(o["kind"]["segm"] == "missed" for o in view.objects)
                caption = f"image {image_id}: {missed} missed object{'s' * (missed != 1)}"
            else:
                top = max(d["score"] for d in view.detections if d["kind"]["segm"] not in ("tp", "ignored"))
                caption = f"image {image_id}: a false positive scoring {top:.2f}"
            picture = draw_errors(view, class_names=evaluation.class_names, iou_type="segm", score_thresh=score_thresh)
            gallery.figures.append((caption, save_png(picture, fig_dir / f"worst_{reason}_{rank}.png")))
    if not gallery.figures:
        gallery.text.append("No missed object and no false positive among the images that could be pictured.")
    return [breakdown, by_size, *mask_ceiling_sections(metrics), confusion, gallery]


def build_report(
    run_dir: str | Path,
    *,
    config: Config,
    evaluation: EvalResult,
    metrics_jsonl: str | Path | None = None,
    title: str = "Mask R-CNN run",
    image_set: str = "val",
) -> tuple[Path, Path]:
    """Writes every figure into run_dir/figures and the report as run_dir/report.md and run_dir/report.html.

    Args:
        run_dir: the run directory (its metrics.jsonl gives the loss curves when present).
        config: the run's config (printed at the end, and the picture settings of `config.eval`).
        evaluation: the evaluation to report: metrics, PR curves and the pictured images with their outputs.
        metrics_jsonl: training log for the loss curves; None: run_dir/metrics.jsonl (no curves if absent).
        title: the report's heading.
        image_set: the evaluated image set's name; its browsable page is run_dir/browse_<image_set>.html.
    Returns:
        (report.md path, report.html path).
    """
    run_dir, folder = Path(run_dir), RunFolder(run_dir)
    fig_dir = folder.figures
    log.info(f"report: drawing loss curves, stage pictures and precision-recall curves into {fig_dir}")
    metrics_path = Path(metrics_jsonl) if metrics_jsonl is not None else folder.metrics_jsonl
    losses = plot_loss_curves(read_metrics_jsonl(metrics_path), fig_dir) if metrics_path.is_file() else {}
    pictures = render_stage_pictures(evaluation.pictures[:STAGE_PICTURES], fig_dir, class_names=evaluation.class_names,
                                     score_thresh=config.eval.vis_score_thresh, top_proposals=config.eval.vis_proposals)
    pr = {
        kind: plot_pr_curves(evaluation.pr_curves[kind], fig_dir / f"pr_{kind}.png",
                             title=f"{label} precision-recall at IoU {evaluation.metrics['voc']['iou_thresh']:g}")
        for kind, label in (("bbox", "BoxHead"), ("segm", "MaskHead"))
    }

    def stage(title: str, text: str, loss_key: str, picture_key: str, what: str) -> Section:
        section = Section(title, text=[text])
        if loss_key in losses:
            section.figures.append((f"{title} loss curves", losses[loss_key]))
        section.figures += [(f"{title} {what}, image {i} (left: ground truth)", p) for i, p in enumerate(pictures[picture_key])]
        return section

    sections = [
        stage("RPN", f"Top {config.eval.vis_proposals} proposals by objectness on held-out images.", "loss_rpn", "rpn",
              "proposals"),
        stage("BoxHead", f"Final detections scoring at least {config.eval.vis_score_thresh:g}, with class and score.",
              "loss_box_head", "box_head", "detections"),
        stage("MaskHead", f"Predicted masks in class colours (detections scoring at least "
              f"{config.eval.vis_score_thresh:g}).{mask_loss_note(config)}", "loss_mask_head", "mask_head", "masks"),
        Section("Precision-recall", text=["Per-class precision-recall curves, AP in the legend."],
                figures=[("BoxHead precision-recall", pr["bbox"]), ("MaskHead precision-recall", pr["segm"])]),
        *metrics_sections(evaluation.metrics),
        *error_sections(evaluation, fig_dir, score_thresh=config.eval.vis_score_thresh),
    ]
    pictured = [evaluation.views[int(p.target["image_id"])] for p in evaluation.pictures]
    browse = write_browse_page(folder.browse_page(image_set), pictured, class_names=evaluation.class_names,
                               title=f"{title}: {image_set} images", score_thresh=config.eval.vis_score_thresh)
    sections.insert(0, Section("Browse the images", links=[(
        f"the {len(pictured)} pictured {image_set} images (eval.num_vis) with ground truth, predictions, masks, a "
        f"score slider and filters by class and error type", browse)]))
    if "loss_total" in losses:
        sections.append(Section("Total loss", figures=[("Sum of all loss terms", losses["loss_total"])]))
    sections.append(Section("Config", code=yaml.safe_dump(config_to_dict(config), sort_keys=False)))

    md_path, html_path = folder.report_md, folder.report_html
    write_text_atomic(md_path, to_markdown(title, sections, run_dir))
    write_text_atomic(html_path, to_html(title, sections, run_dir))
    return md_path, html_path


def mask_loss_note(config: Config) -> str:
    """What the mask loss curve plots when model.mask_head.loss_weight is not the paper's 1 ("" when it is)."""
    weight = config.model.mask_head.loss_weight
    if weight == 1:
        return ""
    return (f" The mask loss curve plots the weighted loss, {weight:g} x the per-pixel binary cross-entropy "
            f"(model.mask_head.loss_weight: {weight:g}).")


def to_markdown(title: str, sections: list[Section], run_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.text:
            lines += [paragraph, ""]
        for text, path in section.links:
            lines += [f"[{text}]({path.relative_to(run_dir).as_posix()})", ""]
        for header, rows in section.tables:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        for caption, path in section.figures:
            lines += [f"![{caption}]({path.relative_to(run_dir).as_posix()})", ""]
        if section.code is not None:
            lines += ["```yaml", section.code.rstrip(), "```", ""]
    return "\n".join(lines)


def to_html(title: str, sections: list[Section], run_dir: Path) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}</style>",
        "</head><body>", f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        parts += [f"<p>{esc(paragraph)}</p>" for paragraph in section.text]
        parts += [f"<p><a href='{esc(path.relative_to(run_dir).as_posix())}'>{esc(text)}</a></p>"
                  for text, path in section.links]
        for header, rows in section.tables:
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        for caption, path in section.figures:
            src = esc(path.relative_to(run_dir).as_posix())
            parts.append(f"<figure><img src='{src}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>")
        if section.code is not None:
            parts.append(f"<pre>{esc(section.code)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
