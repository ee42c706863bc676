"""The pipeline steps' own logic: what the pretrain step hands to fine-tuning."""

from pathlib import Path

import pytest

from drseg.artifacts import ENCODER_FILE
from drseg.config import ModelSettings, PretrainSettings, TrackingSettings
from drseg.steps import pretrain_step, pretrained_encoder


def test_pretraining_off_hands_random_init_to_finetune(tmp_path: Path) -> None:
    out = tmp_path / "pretrain"
    figures = pretrain_step(
        [tmp_path / "no-pool-needed"],
        None,
        out,
        ModelSettings(),
        PretrainSettings(enabled=False),
        TrackingSettings(enabled=False),
        tmp_path,
        "p-1",
    )
    assert figures["skipped"] is True
    assert pretrained_encoder(out) is None
    assert not (out / ENCODER_FILE).exists()


def test_a_folder_without_encoder_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no encoder\.pt; pass the output folder"):
        pretrained_encoder(tmp_path)
    (tmp_path / ENCODER_FILE).write_bytes(b"weights")
    assert pretrained_encoder(tmp_path) == tmp_path / ENCODER_FILE
