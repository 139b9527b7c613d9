"""The `maskrcnn data convert | check | split` subcommands: their parsers and handlers. cli.py's `data` command
adds them with `add_data_parsers(data_sub)`; each handler calls `maskrcnn.app.data_tools`, prints what it returns
and gives the exit status.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SOURCE_FORMATS = ("labelme", "yolo-seg", "voc", "cvat")  # maskrcnn.data.formats.SOURCE_FORMATS, without importing it


def cmd_data_convert(args: argparse.Namespace) -> int:
    from maskrcnn.app import data_tools

    summary = data_tools.convert(args.source_format, args.src, args.out, split=args.split, images_dir=args.images)
    print("\n".join(summary.lines()))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Exit status 1 when a problem would fail training (with --strict: any problem), else 0."""
    from maskrcnn.app import data_tools
    from maskrcnn.errors import UserError

    page = args.page
    if page is None and args.out is not None and not args.no_page:
        page = Path(args.out).with_suffix(".html")  # beside the summary
    if page is not None and args.out is not None and Path(page).resolve() == Path(args.out).resolve():
        raise UserError(f"--page and --out name the same file {args.out}")
    result = data_tools.check(args.json, args.images, args.out, box_iou_threshold=args.box_iou,
                              decode_images=not args.headers_only)
    print("\n".join(result.lines()) + (f"\nwrote {args.out}" if args.out else ""))
    if page is not None:
        print(data_tools.ground_truth_page(result, page, limit=args.page_limit))
    return 1 if result.fails_training or (args.strict and result.problems) else 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def cmd_data_split(args: argparse.Namespace) -> int:
    from maskrcnn.app import data_tools

    print("\n".join(data_tools.split(args.json, args.val, args.seed, args.out_dir)))
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def add_data_parsers(data_sub) -> None:
    """Adds convert, check and split to the `data` command's subparsers."""
    convert = data_sub.add_parser(
        "convert", help="convert LabelMe / YOLO-seg / VOC / CVAT annotations to a COCO json",
        description="Convert annotations to a COCO instances json: image sizes read from the files, class names "
                    "kept, the source's polygons (or masks, as RLE).")
    convert.add_argument("--from", dest="source_format", required=True, choices=SOURCE_FORMATS,
                         help="the source's format")
    convert.add_argument("src", metavar="SRC", help="labelme: the folder of the per-image jsons; yolo-seg: the "
                                                    "dataset yaml (or a folder with classes.txt); voc: the folder "
                                                    "with JPEGImages/; cvat: the annotations XML")
    convert.add_argument("--out", required=True, metavar="JSON", help="the COCO json to write")
    convert.add_argument("--split", metavar="NAME", help="yolo-seg: the yaml's split (default train); voc: an "
                                                         "ImageSets/Segmentation list; cvat: an image subset")
    convert.add_argument("--images", metavar="DIR", help="cvat: the images' folder (default images/ beside the XML)")
    convert.set_defaults(func=cmd_data_convert)

    check = data_sub.add_parser(
        "check", help="count and check a COCO json and its images",
        description="Count images, instances per class, sizes, empty images and crowd regions; list every problem "
                    "with its id; with --page (or --out) write a page of the ground truth to browse. Exit status 1 when "
                    "a problem would fail training.")
    check.add_argument("json", metavar="JSON", help="COCO instances json")
    check.add_argument("--images", required=True, metavar="DIR", help="folder its file_names are relative to")
    check.add_argument("--out", metavar="SUMMARY_JSON", help="also write the counts and problems as JSON")
    check.add_argument("--box-iou", type=_fraction, default=0.7, metavar="IOU",
                       help="a box whose IoU with its mask's box is under this disagrees with it (default 0.7)")
    check.add_argument("--headers-only", action="store_true",
                       help="read image headers only (faster; misses truncated files)")
    check.add_argument("--strict", action="store_true", help="exit status 1 on any problem, not only on those that "
                                                             "would fail training")
    pages = check.add_mutually_exclusive_group()
    pages.add_argument("--page", metavar="PAGE_HTML",
                       help="write a page of the ground truth to browse: one self-contained HTML file (default with "
                            "--out: SUMMARY_JSON's name with .html)")
    pages.add_argument("--no-page", action="store_true", help="no page, even with --out")
    check.add_argument("--page-limit", type=_positive, default=300, metavar="N",
                       help="images pictured on the page at most, those with problems first (default 300)")
    check.set_defaults(func=cmd_data_check)

    split = data_sub.add_parser("split", help="split a COCO json into train.json and val.json by image",
                                description="Split a COCO json by image (seeded): every annotation goes with its "
                                            "image, categories are copied to both.")
    split.add_argument("json", metavar="JSON", help="COCO instances json")
    split.add_argument("--val", type=_fraction, default=0.2, help="fraction of the images for val (default 0.2)")
    split.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    split.add_argument("--out-dir", required=True, metavar="DIR", help="folder for train.json and val.json")
    split.set_defaults(func=cmd_data_split)
