from pathlib import Path

import pytest

from drseg.classes import LESION_TABLE, lesion_class
from drseg.config import SettingsError, load_settings, settings_as_yaml


def test_defaults_need_no_file() -> None:
    settings = load_settings(environ={})
    assert settings.ingest.working_width == 1024
    assert settings.ingest.classes == ("MA", "HE", "EX", "SE", "OD")
    assert settings.home == Path(".drseg")


def test_yaml_then_environment_override(tmp_path: Path) -> None:
    config = tmp_path / "drseg.yaml"
    config.write_text(
        "ingest:\n  working_width: 2048\n  val_fraction: 0.3\nclahe:\n  tile_grid: 4\n"
    )
    settings = load_settings(
        config, environ={"DRSEG_INGEST__WORKING_WIDTH": "512", "DRSEG_HOME": "/tmp/x"}
    )
    assert settings.ingest.working_width == 512  # environment wins over the file
    assert settings.ingest.val_fraction == 0.3  # file wins over defaults
    assert settings.clahe.tile_grid == 4
    assert settings.home == Path("/tmp/x")


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("synth:\n  n: 3\n")
    assert load_settings(environ={"DRSEG_CONFIG": str(config)}).synth.n == 3


def test_unknown_field_names_the_source(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("ingest:\n  working_widht: 2048\n")
    with pytest.raises(SettingsError, match=r"bad\.yaml(.|\n)*ingest\.working_widht: Extra inputs"):
        load_settings(config, environ={})


def test_invalid_value_from_environment() -> None:
    with pytest.raises(SettingsError, match="working_width"):
        load_settings(environ={"DRSEG_INGEST__WORKING_WIDTH": "-3"})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="settings file not found"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_aws_variables_feed_storage_and_secrets_are_masked() -> None:
    settings = load_settings(
        environ={
            "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "very-secret",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        }
    )
    assert settings.storage.endpoint_url == "http://127.0.0.1:9000"
    assert settings.storage.secret_access_key is not None
    assert settings.storage.secret_access_key.get_secret_value() == "very-secret"
    shown = settings_as_yaml(settings)
    assert "very-secret" not in shown and "AKIDEXAMPLE" not in shown
    assert "endpoint_url: http://127.0.0.1:9000" in shown


def test_the_class_table_is_checked_when_the_settings_load() -> None:
    """A mismatched class list fails in milliseconds, not after hours of pretraining."""
    assert load_settings(environ={}).finetune.class_sampling == tuple(
        row.sampling_share for row in LESION_TABLE
    )
    assert lesion_class("SE").folders == ("4. Soft Exudates",)
    cases = {
        "DRSEG_MODEL__CLASSES": ("[MA, OD]", r"each must be one of the lesion classes"),
        "DRSEG_FINETUNE__CLASS_WEIGHTS": ("[1, 1]", r"finetune.class_weights has 2 values"),
    }
    for variable, (value, message) in cases.items():
        with pytest.raises(SettingsError, match=message):
            load_settings(environ={variable: value})
    two = load_settings(
        environ={
            "DRSEG_MODEL__CLASSES": "[HE, EX]",
            "DRSEG_FINETUNE__CLASS_SAMPLING": "[0.5, 0.5]",
            "DRSEG_FINETUNE__CLASS_WEIGHTS": "[1, 1]",
            "DRSEG_GATE__CLASS_MINIMUMS": "{HE: 0.3, EX: 0.3}",
        }
    )
    assert two.model.classes == ("HE", "EX")
