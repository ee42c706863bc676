"""`make bench-gpu`'s suite (bench/gpu_suite.py) in its tiny CPU mode, so it never rots.

A GPU cannot run here: this runs every section the CPU can (torch.compile's are off in the tiny
profile) on synthetic photographs, in a fresh interpreter where the packages a lent GPU
machine lacks (MLflow, kfp, Triton's client) cannot be imported, as there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from drseg.data.synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("mlflow", "kfp", "tritonclient", "pytriton")
LAUNCH = (
    "import runpy, sys\n"
    + "".join(f"sys.modules[{name!r}] = None\n" for name in BLOCKED)
    + "sys.argv = ['gpu_suite.py', *sys.argv[1:]]\n"
    + f"runpy.run_path({str(ROOT / 'bench' / 'gpu_suite.py')!r}, run_name='__main__')\n"
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("gpu-suite")
    photos = work / "photographs"
    write_synthetic_dataset(work / "source", n=1, seed=3, width=320)
    photos.mkdir()
    for photo in (work / "source" / "images").iterdir():
        photo.rename(photos / photo.name)
    out = work / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", LAUNCH, "--tiny", "--out", str(out), "--photographs", str(photos)],
        check=True,
        env=env,
        cwd=work,
    )
    return out, photos


def test_every_section_reports_its_figures(suite: tuple[Path, Path]) -> None:
    results = json.loads((suite[0] / "gpu_suite.json").read_text())
    sections = results["sections"]
    assert sections["finetune_compiled"] == {"skipped": "torch.compile is off in this profile"}
    finetune, pretrain = sections["finetune"], sections["pretrain"]
    assert finetune["plain_loop_images_per_second"] > 0 and finetune["stage_images_per_second"] > 0
    assert finetune["stage_vs_plain"] == pytest.approx(
        finetune["stage_images_per_second"] / finetune["plain_loop_images_per_second"]
    )
    assert pretrain["stage_views_per_second"] > 0 and pretrain["plain_loop_views_per_second"] > 0
    quality = sections["quality"]
    assert set(quality["per_class"]) == {"MA", "HE", "EX", "SE"}
    assert all(0 <= row["aupr"] <= 1 for row in quality["per_class"].values())
    assert quality["photographs"] >= 1 and quality["steps"] >= 1
    modes = sections["inference_modes"]
    served = modes["served (ONNX Runtime, whole image)"]
    assert modes["pytorch whole image"]["merged_dice"] == pytest.approx(
        served["merged_dice"], abs=1e-3
    ), "the exported graph computes what the trained network computes"
    assert {"pytorch whole image + flips", "pytorch tiles 128 + flips"} <= set(modes)
    inference = sections["inference"]
    assert inference["eager_images_per_second"] > 0
    assert inference["onnxruntime_images_per_second"] > 0
    table = (suite[0] / "gpu_suite.md").read_text()
    assert "| stage_images_per_second |" in table and "| EX | aupr" in table


def test_probabilities_are_one_png_per_class_at_the_photographs_size(
    suite: tuple[Path, Path],
) -> None:
    photo = next(suite[1].iterdir())
    height, width = cv2.imread(str(photo)).shape[:2]
    for cls in ("MA", "HE", "EX", "SE"):
        plane = cv2.imread(str(suite[0] / "probabilities" / f"{photo.stem}_{cls}.png"), -1)
        assert plane.shape == (height, width) and plane.dtype == np.uint8
        assert plane[0, 0] == 0, "outside the field of view"
