"""Pretrain stage on 256-px synthetic photographs (CLAHE applied, as in the pipeline).

One run serves most tests, to fit the time budget: SETTINGS trained to step 8 (a
checkpoint), then the same call with max_steps 16 resumes it to the end. Both calls run with
MLflow and kfp unimportable, as on a bare trainer image (finetune's tests check the modules
both stages share in a fresh interpreter).

Views of 32 px and batches of 32 photographs: with the pixels per step of 8 pairs of 64 px
views, NT-Xent falls clearly within 16 steps (62 negatives per view instead of 14). On the
fixed pairs of test_pretraining_lowers_the_loss, this run: 4.06 -> 3.11 (24 steps: 3.07).
In a plain loop at 3e-3: 4.07, 3.38 after 20 steps, 3.22 after 40; with batches of 8 pairs
of 64 px views instead: 3.98 -> 3.80 after 40 steps (1e-3 and 1e-2 did no better).
"""

import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from drseg.config import ClaheSettings, IngestSettings, ModelSettings, PretrainSettings
from drseg.data.dataset import image_path, load_manifest, read_rgb
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.models.unet import build_model, load_encoder
from drseg.train import finetune as finetune_module
from drseg.train import pretrain as pretrain_module
from drseg.train.losses import nt_xent
from drseg.train.pretrain import (
    PretrainResult,
    SimCLRModule,
    embed,
    gathered_views,
    pretrain,
    pretrain_photographs,
)
from drseg.train.views import ViewPairStream, render_pairs

MODEL = ModelSettings(encoder="resnet18", reconstruction_weight=0.0)
SETTINGS = PretrainSettings(
    crop_size=32,
    batch_size=32,
    max_steps=16,
    lr=3e-3,
    warmup_steps=3,
    checkpoint_every=8,
    num_workers=0,
    include_labelled=True,
)
FIRST_STEPS = 8

Metrics = list[tuple[int, dict[str, float]]]


@dataclass(frozen=True)
class Run:
    first: PretrainResult
    first_metrics: Metrics
    result: PretrainResult
    metrics: Metrics
    """What the resumed call logged."""
    messages: list[str]


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six unlabelled photographs (other seeds than the labelled ones), as the pool is."""
    root = tmp_path_factory.mktemp("pool")
    write_synthetic_dataset(root / "src", n=6, seed=11, width=256)
    shutil.rmtree(root / "src" / "masks")
    settings = IngestSettings(layout="unlabelled", working_width=256, workers=1)
    ingest(root / "src", root / "ingested", settings)
    clahe_dataset(root / "ingested", root / "clahe", ClaheSettings(workers=1))
    return root / "clahe"


@pytest.fixture(scope="module")
def labelled(clahe_256: Path) -> Path:
    return clahe_256


@pytest.fixture(scope="module")
def run(pool: Path, labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("run") / "pretrain"
    first_metrics: Metrics = []
    metrics: Metrics = []
    handler = _Messages()
    lightning_log = logging.getLogger(pretrain_module.pl.utilities.rank_zero.__name__)
    lightning_log.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "mlflow", None)
            patch.setitem(sys.modules, "kfp", None)
            patch.setattr(finetune_module, "LOG_EVERY", 1)  # the shared StepLoggedModule's
            short = SETTINGS.model_copy(update={"max_steps": FIRST_STEPS})
            first = pretrain(
                [pool], out, MODEL, short, lambda v, s: first_metrics.append((s, v)), labelled
            )
            result = pretrain(
                [pool], out, MODEL, SETTINGS, lambda v, s: metrics.append((s, v)), labelled
            )
    finally:
        lightning_log.removeHandler(handler)
    return Run(first, first_metrics, result, metrics, handler.messages)


def _module(state: dict[str, torch.Tensor] | None) -> SimCLRModule:
    """The module pretrain starts from (same seed), with `state` loaded if given."""
    pretrain_module.pl.seed_everything(SETTINGS.seed, verbose=False)
    module = SimCLRModule(build_model(MODEL).encoder, [], SETTINGS, None)
    if state is not None:
        module.load_state_dict(state)
    return module


def _checkpoint(result: PretrainResult) -> dict[str, object]:
    last = result.encoder.parent / "checkpoints" / "last.ckpt"
    state: dict[str, object] = torch.load(last, map_location="cpu", weights_only=False)
    return state


def test_pretraining_lowers_the_loss(run: Run, pool: Path, labelled: Path) -> None:
    """NT-Xent on 32 fixed pairs of fresh views, before and after the run."""
    photographs, _ = pretrain_photographs([pool], labelled, include_labelled=True)
    stream = iter(ViewPairStream(photographs, SETTINGS.crop_size, 0.8, (1234,), 0, 32))
    views = render_pairs(default_collate([next(stream) for _ in range(32)]), SETTINGS.crop_size)

    def loss(module: SimCLRModule) -> float:
        with torch.no_grad():  # train mode: batch statistics, as in training
            z = embed(module.encoder, module.projection, views)
            return nt_xent(z[:32], z[32:], SETTINGS.temperature).item()

    state = _checkpoint(run.result)["state_dict"]
    assert isinstance(state, dict)
    before, after = loss(_module(None)), loss(_module(state))
    assert after < 0.9 * before, f"{before:.3f} -> {after:.3f}"
    logged = [values["loss"] for _, values in run.first_metrics + run.metrics if "loss" in values]
    assert np.mean(logged[-4:]) < np.mean(logged[:4])


def test_resumes_from_the_checkpoint_of_a_shorter_run(run: Run) -> None:
    assert run.first.steps == FIRST_STEPS
    assert [s for s, v in run.first_metrics if "loss" in v] == list(range(1, FIRST_STEPS + 1))
    assert f"resuming from step {FIRST_STEPS}" in " ".join(run.messages)
    # Progress lines, for logs that are not a terminal (drseg.train.finetune.PROGRESS_LINES).
    assert any(
        m.startswith(f"step {SETTINGS.max_steps}/{SETTINGS.max_steps}: loss") for m in run.messages
    )
    loss_steps = [step for step, values in run.metrics if "loss" in values]
    assert loss_steps == list(range(FIRST_STEPS + 1, SETTINGS.max_steps + 1))
    assert run.result.steps == 16
    assert _checkpoint(run.result)["global_step"] == 16
    assert run.first_metrics[0][1]["lr"] == pytest.approx(3e-3 / 3)  # warm-up
    # Cosine to 0 at step 16: the schedule follows the global step across the resume.
    assert run.metrics[-2][1]["lr"] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 12 / 13)))


def test_saved_encoder_loads_into_the_finetune_model(run: Run) -> None:
    state = _checkpoint(run.result)["state_dict"]
    assert isinstance(state, dict)
    for settings in (MODEL, MODEL.model_copy(update={"reconstruction_weight": 0.1})):
        network = build_model(settings)
        load_encoder(network, run.result.encoder)  # strict: raises on any missing/extra key
        loaded = network.encoder.state_dict()
        assert loaded.keys() == {k[len("encoder.") :] for k in state if k.startswith("encoder.")}
        assert all(torch.equal(loaded[key], state[f"encoder.{key}"]) for key in loaded)
    initial = _module(None).encoder.state_dict()
    assert not torch.equal(loaded["conv1.weight"], initial["conv1.weight"])


def test_encoder_file_records_settings_inputs_and_result(
    run: Run, pool: Path, labelled: Path
) -> None:
    payload = torch.load(run.result.encoder, weights_only=True)
    assert payload["encoder_name"] == "resnet18"
    train = sum(r.split == "train" for r in load_manifest(labelled).records)
    assert payload["meta"] == {
        "pretrain": json.loads(SETTINGS.model_dump_json()),
        "dataset_hashes": [load_manifest(pool).dataset_hash, load_manifest(labelled).dataset_hash],
        "photographs": 6 + train,
        "steps": 16,
        "final_loss": run.result.final_loss,
    }
    assert math.isfinite(run.result.final_loss)
    assert run.result.final_loss == pytest.approx(run.metrics[-2][1]["loss"])
    steps_run = 16 - FIRST_STEPS
    views = steps_run * SETTINGS.batch_size * 2
    assert run.result.images_per_second == pytest.approx(views / run.result.seconds)
    assert run.metrics[-1] == (
        16,
        {
            "images_per_second": run.result.images_per_second,
            "train_seconds": run.result.seconds,
            "steps_run": float(steps_run),
        },
    )


def test_a_rerun_of_a_finished_run_trains_nothing(run: Run, pool: Path, labelled: Path) -> None:
    before = torch.load(run.result.encoder, weights_only=True)
    metrics: Metrics = []
    again = pretrain(
        [pool],
        run.result.encoder.parent,
        MODEL,
        SETTINGS,
        lambda v, s: metrics.append((s, v)),
        labelled,
    )
    assert again.steps == 16
    assert again.final_loss == pytest.approx(run.result.final_loss)
    assert metrics == [(16, {"images_per_second": 0.0, "train_seconds": 0.0, "steps_run": 0.0})]
    after = torch.load(again.encoder, weights_only=True)
    assert all(torch.equal(after["encoder"][k], v) for k, v in before["encoder"].items())


def test_a_checkpoint_of_other_settings_is_refused(run: Run, pool: Path, labelled: Path) -> None:
    last = run.result.encoder.parent / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    other = SETTINGS.model_copy(update={"projection_dim": 64})
    with pytest.raises(ValueError, match=r"last\.ckpt: cannot resume.*wrong shapes: 2"):
        pretrain([pool], last.parents[1], MODEL, other, None, labelled)
    assert last.stat().st_mtime_ns == before


def test_pool_takes_every_record_and_labelled_only_its_train_split(
    pool: Path, labelled: Path
) -> None:
    manifest = load_manifest(labelled)
    val = [read_rgb(image_path(labelled, r.id)) for r in manifest.records if r.split == "val"]
    assert val, "the labelled fixture needs a val record"
    assert {r.split for r in load_manifest(pool).records} == {"train", "val"}

    photographs, hashes = pretrain_photographs([pool], labelled, include_labelled=True)
    assert len(photographs) == 6 + len(manifest.records) - len(val)
    assert not any(np.array_equal(p.image, image) for p in photographs for image in val)
    assert hashes == [load_manifest(pool).dataset_hash, manifest.dataset_hash]

    photographs, hashes = pretrain_photographs([pool], labelled, include_labelled=False)
    assert len(photographs) == 6
    assert hashes == [load_manifest(pool).dataset_hash]


def test_no_photograph_is_an_error_that_names_the_folders(labelled: Path, tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"include_labelled": False})
    with pytest.raises(
        ValueError, match=r"no photograph in no dataset folder; .* left out"
    ) as error:
        pretrain([], tmp_path, MODEL, settings, None, labelled)
    assert str(labelled) in str(error.value)
    assert "pretrain.include_labelled: true" in str(error.value)
    assert not (tmp_path / "encoder.pt").exists()


def test_gathered_embeddings_keep_their_pairs() -> None:
    """Two devices' [z1; z2] gathered: all first views, then all their partners, in order."""
    z = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)  # (world, 2n, D)
    z1, z2 = gathered_views(z, 3)
    assert torch.equal(z1, torch.cat([z[0, :3], z[1, :3]]))
    assert torch.equal(z2, torch.cat([z[0, 3:], z[1, 3:]]))
    one1, one2 = gathered_views(z[0], 3)  # one device: no world axis
    assert torch.equal(one1, z[0, :3])
    assert torch.equal(one2, z[0, 3:])
