from pathlib import Path

import pytest

from drseg.classes import LESION_TABLE, lesion_class
from drseg.config import SettingsError, load_settings, settings_as_yaml, with_options


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
    with pytest.raises(
        SettingsError, match=r"ingest\.working_widht \(from .*bad\.yaml\): no such setting"
    ):
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


def test_environment_values_are_typed_by_their_field() -> None:
    settings = load_settings(
        environ={
            "DRSEG_TRACKING__EXPERIMENT": "2024",
            "DRSEG_CLUSTER__NAMESPACE": "no",
            "DRSEG_TRACKING__ENABLED": "no",
            "DRSEG_FINETUNE__LR": "1e-3",
            "DRSEG_FINETUNE__DEVICES": "2",
            "DRSEG_MODEL__CLASSES": "[ma, he]",
            "DRSEG_INGEST__CLASSES": "[MA, HE, OD]",
            "DRSEG_FINETUNE__CLASS_SAMPLING": "[0.75, 0.25]",
            "DRSEG_FINETUNE__CLASS_WEIGHTS": "[1, 2]",
            "DRSEG_GATE__CLASS_MINIMUMS": "{ma: 0.25}",
            "DRSEG_CLUSTER__GPU_NODE_SELECTOR": "{gpu: 'yes'}",
            "DRSEG_EXPORT__TRT_MAX_SHAPE": "[2, 1024, 1024]",
        }
    )
    assert settings.tracking.experiment == "2024"  # a string field keeps the text
    assert settings.cluster.namespace == "no"  # not the YAML boolean False
    assert settings.tracking.enabled is False  # a boolean field parses "no"
    assert settings.finetune.lr == 1e-3
    assert settings.finetune.devices == 2
    assert settings.model.classes == ("MA", "HE")
    assert settings.finetune.class_sampling == (0.75, 0.25)
    assert settings.finetune.class_weights == (1.0, 2.0)
    assert settings.gate.class_minimums == {"MA": 0.25}
    assert settings.cluster.gpu_node_selector == {"gpu": "yes"}
    assert settings.export.trt_max_shape == (2, 1024, 1024)


def test_a_misspelt_variable_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match=r"ingest\.working_widht \(from DRSEG_INGEST__WORK"):
        load_settings(environ={"DRSEG_INGEST__WORKING_WIDHT": "2048"})


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        (
            {"DRSEG_INGEST__WORKING_WIDTH": "10"},
            r"ingest\.working_width \(from DRSEG_INGEST__WORKING_WIDTH\): working width 10 px "
            r"is outside 128\.\.8192: below 128 px lesions vanish",
        ),
        (
            {"DRSEG_INGEST__WORKING_WIDTH": "9000"},
            r"working width 9000 px is outside 128\.\.8192",
        ),
        (
            {"DRSEG_FINETUNE__PATCH_SIZE": "100"},
            r"finetune\.patch_size \(from DRSEG_FINETUNE__PATCH_SIZE\): 100 is not a multiple "
            r"of 32 .*; use 96",
        ),
        ({"DRSEG_PRETRAIN__CROP_SIZE": "200"}, r"pretrain\.crop_size .*: 200 .* use 192"),
        (
            {"DRSEG_MODEL__CLASSES": "[MA, HE]"},
            r"finetune\.class_sampling has 4 values for the 2 model\.classes \['MA', 'HE'\]; "
            r"give one value per class",
        ),
        (
            {"DRSEG_INGEST__CLASSES": "[MA, HE, EX, OD]"},
            r"model\.classes \['SE'\] are not in ingest\.classes",
        ),
        (
            {"DRSEG_GATE__CLASS_MINIMUMS": "{ma: 0.2, od: 0.5}"},
            r"gate\.class_minimums names \['OD'\], which are not in model\.classes",
        ),
        (
            {"DRSEG_INGEST__WORKING_WIDTH": "256"},
            r"finetune\.patch_size = 512 is wider than the photographs \(ingest\.working_width "
            r"= 256\); use at most 256",
        ),
        ({"DRSEG_MODEL__CLASSES": "[]"}, r"model\.classes .*non-empty list of unique names"),
        (
            {"DRSEG_MODEL__DECODER_CHANNELS": "[64, 32, 16, 8]"},
            r"model\.decoder_channels .*give five positive widths",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused_at_load_with_the_fix(
    environ: dict[str, str], problem: str
) -> None:
    with pytest.raises(SettingsError, match=problem) as raised:
        load_settings(environ=environ)
    assert "\n" not in str(raised.value)


def test_a_file_value_is_named_with_its_file(tmp_path: Path) -> None:
    config = tmp_path / "small.yaml"
    config.write_text("finetune:\n  patch_size: 500\n")
    with pytest.raises(SettingsError, match=r"finetune\.patch_size \(from .*small\.yaml\)"):
        load_settings(config, environ={})


def test_command_line_options_are_checked_like_settings() -> None:
    ingest = load_settings(environ={}).ingest
    assert with_options(ingest, "ingest", {"working_width": 256, "layout": None}).working_width == (
        256
    )
    with pytest.raises(SettingsError, match=r"ingest\.working_width \(from the command line\)"):
        with_options(ingest, "ingest", {"working_width": 10})


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
