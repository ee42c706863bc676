"""The evaluation report as one self-contained Markdown file, for the KFP UI.

A run's page in Kubeflow Pipelines renders a Markdown artifact, but the artifact is one file
in the object store: the report's relative image links (pr_curves.png, overlays/) lead
nowhere there. So each image goes inline as a base64 data URI, downscaled so that a report
with its overlays stays a few hundred kilobytes: overlays (photographs) as JPEG, plots as PNG.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import cv2
import numpy as np

from drseg.evaluate.report import OVERLAYS_DIR

IMAGE_LINK = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<target>[^)\s]+)\)")
MAX_WIDTH = 640
"""Widest embedded image, px: the width of the KFP UI's artifact pane, roughly."""
JPEG_QUALITY = 85


def _data_uri(path: Path, photograph: bool, max_width: int) -> str:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image; re-run the evaluation that wrote it")
    height, width = image.shape[:2]
    if width > max_width:
        size = (max_width, max(1, round(height * max_width / width)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if photograph:
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        kind = "jpeg"
    else:
        ok, encoded = cv2.imencode(".png", image)
        kind = "png"
    assert ok, f"{path}: OpenCV could not encode it as {kind}"
    text = base64.b64encode(np.asarray(encoded).tobytes()).decode("ascii")
    return f"data:image/{kind};base64,{text}"


def embedded_report(report: Path, max_width: int = MAX_WIDTH) -> str:
    """The Markdown of `report` (an evaluation's report.md) with every image it links to
    by a relative path inlined, downscaled to at most `max_width` px wide."""
    folder = Path(report).parent

    def inline(link: re.Match[str]) -> str:
        target = link["target"]
        if ":" in target:  # http(s)://, data:, ... : not a file of the report
            return link[0]
        path = folder / target
        if not path.is_file():
            raise FileNotFoundError(
                f"{report}: links to {target}, which is not in {folder}; pass the report "
                "inside its evaluation folder (`drseg evaluate` output)"
            )
        photograph = Path(target).parts[0] == OVERLAYS_DIR
        return f"![{link['alt']}]({_data_uri(path, photograph, max_width)})"

    return IMAGE_LINK.sub(inline, Path(report).read_text())
