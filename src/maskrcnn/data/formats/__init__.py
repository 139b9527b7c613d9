"""Annotations of the labelling tools people use, converted to a COCO instances dict: LabelMe, Ultralytics YOLO
segmentation, Pascal VOC segmentation, CVAT for images. Image sizes are read from the image files, class names
are kept, masks are the source's polygons or pixels (see builder.py for the coordinate convention).

Written here rather than through Datumaro: its PyPI release reads neither LabelMe's json (its "labelme" is MIT
LabelMe's XML) nor YOLO segmentation (boxes only), and it installs about 540 MB (pyarrow, pandas, a second
OpenCV) for the two formats it does read.
"""

from __future__ import annotations

from pathlib import Path

from maskrcnn.data.common import DatasetError
from maskrcnn.data.formats.builder import Conversion
from maskrcnn.data.formats.cvat import convert_cvat
from maskrcnn.data.formats.labelme import convert_labelme
from maskrcnn.data.formats.voc import convert_voc
from maskrcnn.data.formats.yolo_seg import convert_yolo_seg

SOURCE_FORMATS = ("labelme", "yolo-seg", "voc", "cvat")

__all__ = ["SOURCE_FORMATS", "Conversion", "convert_cvat", "convert_labelme", "convert_source", "convert_voc",
           "convert_yolo_seg"]


def convert_source(source_format: str, source: str | Path, *, split: str | None = None,
                   images_dir: str | Path | None = None) -> Conversion:
    """The data of one of SOURCE_FORMATS as COCO.

    Args:
        source: labelme: the folder of the jsons; yolo-seg: the dataset yaml or a folder with classes.txt; voc: the
            folder with JPEGImages/; cvat: the XML.
        split: yolo-seg: the yaml's key (default train); voc: the ImageSets/Segmentation list (default: every
            image); cvat: the images' subset (default: every image); labelme: not allowed.
        images_dir: cvat only: the folder the image names are relative to.
    Raises:
        DatasetError: an unknown format, an option the format has not, or bad data (file and entry named).
    """
    if source_format not in SOURCE_FORMATS:
        raise DatasetError(f"unknown annotation format {source_format!r}; one of {', '.join(SOURCE_FORMATS)}")
    if images_dir is not None and source_format != "cvat":
        raise DatasetError(f"{source_format}: the images' folder follows from the source; --images is for cvat")
    if not Path(source).exists():
        raise DatasetError(f"{source}: not found")
    if source_format == "labelme":
        if split is not None:
            raise DatasetError(f"{source}: a LabelMe folder has no splits; convert each split's folder")
        return convert_labelme(source)
    if source_format == "yolo-seg":
        return convert_yolo_seg(source, split)
    if source_format == "voc":
        return convert_voc(source, split)
    return convert_cvat(source, images_dir, split)
