from pathlib import Path

import pytest
import torch

from drseg.cli import user_message
from drseg.config import ModelSettings
from drseg.errors import UserError
from drseg.models.unet import LESION_PRIOR, MultiTaskUNet, build_model, load_encoder, save_encoder


@pytest.fixture(scope="module")
def model() -> MultiTaskUNet:
    torch.manual_seed(0)
    return MultiTaskUNet("resnet18", num_classes=4, reconstruction=True).eval()


@pytest.mark.parametrize(("height", "width"), [(64, 96), (128, 32), (50, 70)])
def test_both_heads_give_full_resolution_maps(
    model: MultiTaskUNet, height: int, width: int
) -> None:
    with torch.no_grad():
        logits, reconstruction = model(torch.randn(2, 3, height, width))
    assert logits.shape == (2, 4, height, width)
    assert reconstruction is not None
    assert reconstruction.shape == (2, 3, height, width)


def test_segmentation_starts_at_the_lesion_prior(model: MultiTaskUNet) -> None:
    head = model.unet.segmentation_head[0]
    assert torch.sigmoid(head.bias).allclose(torch.tensor(LESION_PRIOR))


def test_reconstruction_weight_zero_turns_the_head_off() -> None:
    model = build_model(ModelSettings(encoder="resnet18", reconstruction_weight=0.0)).eval()
    assert model.reconstruction_head is None
    with torch.no_grad():
        logits, reconstruction = model(torch.randn(1, 3, 32, 64))
    assert logits.shape == (1, 4, 32, 64)
    assert reconstruction is None
    assert build_model(ModelSettings(encoder="resnet18")).reconstruction_head is not None


def test_the_decoder_is_as_wide_as_set() -> None:
    settings = ModelSettings(encoder="resnet18", decoder_channels=(64, 32, 16, 16, 8))
    model = build_model(settings).eval()
    assert model.unet.segmentation_head[0].in_channels == 8
    assert model.reconstruction_head is not None
    assert model.reconstruction_head[0].in_channels == 8
    default = build_model(ModelSettings(encoder="resnet18"))
    assert default.unet.segmentation_head[0].in_channels == 16
    narrow = sum(p.numel() for p in model.unet.decoder.parameters())
    assert narrow < sum(p.numel() for p in default.unet.decoder.parameters()) / 4
    with torch.no_grad():
        logits, _ = model(torch.randn(1, 3, 64, 96))
    assert logits.shape == (1, 4, 64, 96)


def test_encoder_round_trip(model: MultiTaskUNet, tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    save_encoder(model, path, {"epochs": 3, "dataset_hash": "abc"})
    payload = torch.load(path, weights_only=True)
    assert payload["encoder_name"] == "resnet18"
    assert payload["meta"] == {"epochs": 3, "dataset_hash": "abc"}

    torch.manual_seed(1)
    other = MultiTaskUNet("resnet18", num_classes=4, reconstruction=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(other.encoder(x)[-1], model.encoder(x)[-1])
        load_encoder(other, path)
        for mine, theirs in zip(other.encoder(x), model.encoder(x), strict=True):
            assert torch.equal(mine, theirs)
    # Only the encoder was replaced: the decoders still differ.
    assert not torch.equal(
        other.unet.decoder.state_dict()["blocks.0.conv1.0.weight"],
        model.unet.decoder.state_dict()["blocks.0.conv1.0.weight"],
    )


def test_encoder_of_another_architecture_is_refused(model: MultiTaskUNet, tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    save_encoder(model, path, {})
    target = MultiTaskUNet("resnet34", num_classes=4)
    before = target.encoder.state_dict()["conv1.weight"].clone()
    with pytest.raises(
        UserError, match=r"encoder\.pt.*'resnet18'.*'resnet34'.*model\.encoder"
    ) as refused:
        load_encoder(target, path)
    # A user's to fix: the CLI prints the one line, not "internal error".
    assert user_message(refused.value) == str(refused.value)
    assert torch.equal(target.encoder.state_dict()["conv1.weight"], before)


def test_encoder_file_with_missing_and_unexpected_keys_is_refused(
    model: MultiTaskUNet, tmp_path: Path
) -> None:
    weights = dict(model.encoder.state_dict())
    del weights["layer4.1.bn2.weight"]
    weights["projection.weight"] = torch.zeros(2)
    path = tmp_path / "broken.pt"
    torch.save({"encoder": weights, "encoder_name": "resnet18", "meta": {}}, path)
    with pytest.raises(ValueError, match=r"broken\.pt") as error:
        load_encoder(MultiTaskUNet("resnet18"), path)
    assert "missing keys: 1 (layer4.1.bn2.weight)" in str(error.value)
    assert "unexpected keys: 1 (projection.weight)" in str(error.value)


def test_missing_or_foreign_encoder_file_names_the_fix(tmp_path: Path) -> None:
    target = MultiTaskUNet("resnet18")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt.*pretrain"):
        load_encoder(target, tmp_path / "nowhere.pt")
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"foreign\.pt: not an encoder weights file"):
        load_encoder(target, tmp_path / "foreign.pt")
