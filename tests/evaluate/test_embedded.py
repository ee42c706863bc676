"""The evaluation report with its images inline, as the KFP UI shows it."""

import base64
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from drseg.config import IngestSettings
from drseg.data.ingest import ingest
from drseg.evaluate.embedded import embedded_report
from drseg.evaluate.report import evaluate_dataset
from tests.evaluate.test_report import SETTINGS, TruthScorer

DATA_URI = re.compile(
    r"!\[(?P<alt>[^\]]*)\]\(data:image/(?P<kind>png|jpeg);base64,(?P<b64>[^)]+)\)"
)


@pytest.fixture(scope="module")
def report(synthetic_generic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real evaluation folder: report.md, pr_curves.png and two overlays."""
    root = tmp_path_factory.mktemp("embedded")
    ingest(synthetic_generic, root / "dataset", IngestSettings(working_width=128, workers=1))
    scorer = TruthScorer(root / "dataset")
    result = evaluate_dataset(scorer, root / "dataset", root / "eval", SETTINGS, "test", "train")
    return result.report_path


def _images(markdown: str) -> dict[str, tuple[str, np.ndarray]]:
    found = {}
    for link in DATA_URI.finditer(markdown):
        raw = np.frombuffer(base64.b64decode(link["b64"]), np.uint8)
        found[link["alt"]] = (link["kind"], cv2.imdecode(raw, cv2.IMREAD_COLOR))
    return found


def test_every_image_is_inline_and_the_text_is_kept(report: Path) -> None:
    original = report.read_text()
    markdown = embedded_report(report)
    assert ".png)" not in markdown, "a relative image link is left: the KFP UI cannot follow it"
    images = _images(markdown)
    linked = re.findall(r"!\[([^\]]*)\]\(", original)
    assert sorted(images) == sorted(linked) and len(linked) == 3  # curves + two overlays
    kind, curves = images["precision-recall curves"]
    assert kind == "png"
    assert curves.shape[1] == 640  # 900 px wide as plotted: downscaled
    for alt, (kind, overlay) in images.items():
        if alt != "precision-recall curves":
            assert kind == "jpeg", alt  # a photograph
            on_disk = cv2.imread(str(report.parent / "overlays" / f"{alt}.png"))
            assert overlay.shape == on_disk.shape  # narrower than 640 px: as it is
            assert np.abs(overlay.astype(int) - on_disk).mean() < 8
    without_images = DATA_URI.sub("", markdown)
    assert without_images == re.sub(r"!\[[^\]]*\]\([^)]+\)", "", original)


def test_images_are_downscaled_keeping_their_shape(report: Path) -> None:
    images = _images(embedded_report(report, max_width=100))
    for alt, (_, image) in images.items():
        if alt == "precision-recall curves":
            continue
        on_disk = cv2.imread(str(report.parent / "overlays" / f"{alt}.png"))
        height, width = on_disk.shape[:2]
        assert image.shape[:2] == (round(height * 100 / width), 100)
    assert len(embedded_report(report, max_width=100)) < len(embedded_report(report)) < 300_000


def test_a_missing_image_names_the_report_and_the_file(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    report.write_text("# r\n\n![curves](pr_curves.png)\n\n![site](https://example.org/a.png)\n")
    with pytest.raises(FileNotFoundError, match=r"report\.md: links to pr_curves\.png"):
        embedded_report(report)
    (tmp_path / "pr_curves.png").write_bytes(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1])
    markdown = embedded_report(report)
    assert "![site](https://example.org/a.png)" in markdown  # not a file of the report
    assert "![curves](data:image/png;base64," in markdown
