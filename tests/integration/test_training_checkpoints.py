"""Training survives a lost pod: checkpoints go to the object store (a real SeaweedFS) as
they are written, and a run started again in a NEW, empty folder resumes from there.

The first run is a separate process killed with SIGKILL once the store holds its first
checkpoint (what a lost pod leaves behind: nothing local survives it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from drseg.config import FinetuneSettings, IngestSettings, ModelSettings, PretrainSettings
from drseg.data.ingest import ingest
from drseg.train import checkpoint_store
from drseg.train import finetune as finetune_module
from drseg.train.checkpoint_store import REMOTE_NAME, RemoteCheckpoint
from drseg.train.finetune import finetune
from tests.integration.s3_server import S3Server

MODEL = ModelSettings(encoder="mobilenet_v2", reconstruction_weight=0.0)
"""The smallest encoder at hand: its checkpoint (weights and AdamW moments) is ~80 MB."""
STEPS = 8
EVERY = 4
SEEN_BEFORE_KILL = 1
"""Checkpoints the store must have held before the kill (so step 4 or later)."""

CHILD = """
import json, sys
from pathlib import Path
from drseg.config import FinetuneSettings, ModelSettings, load_settings
from drseg.train import finetune

finetune.finetune(
    Path(sys.argv[1]),
    Path(sys.argv[2]),
    ModelSettings.model_validate_json(sys.argv[3]),
    FinetuneSettings.model_validate_json(sys.argv[4]),
    storage=load_settings().storage,  # AWS_* variables, as a pod gets them from its Secret
)
"""


@pytest.fixture(scope="module")
def dataset(synthetic_generic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints") / "dataset"
    ingest(synthetic_generic, out, IngestSettings(working_width=128, workers=1))
    return out


def _settings(uri: str) -> FinetuneSettings:
    return FinetuneSettings(
        patch_size=64,
        batch_size=2,
        max_steps=STEPS,
        warmup_steps=1,
        checkpoint_every=EVERY,
        checkpoint_uri=uri,
        precision="32-true",
    )


def _step(checkpoint: bytes, where: Path) -> int:
    where.write_bytes(checkpoint)
    return int(torch.load(where, map_location="cpu", weights_only=False)["global_step"])


def _run_until_killed(
    s3_server: S3Server, bucket: str, prefix: str, dataset: Path, out: Path
) -> None:
    """Start training in its own process; SIGKILL it once the bucket has held
    SEEN_BEFORE_KILL different checkpoints. No deadline of its own: on a loaded machine
    training is slow, not wrong (the suite's timeout bounds a hang)."""
    env = os.environ | {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url,
        "AWS_DEFAULT_REGION": s3_server.region,
    }
    settings = _settings(f"s3://{bucket}/{prefix}")
    command = [sys.executable, "-c", CHILD, str(dataset), str(out)]
    command += [MODEL.model_dump_json(), settings.model_dump_json()]
    client = s3_server.client()
    key = f"{prefix}/{REMOTE_NAME}"
    with (out.parent / "killed.log").open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        etags: set[str] = set()
        try:
            while len(etags) < SEEN_BEFORE_KILL:
                assert child.poll() is None, f"the training process ended; see {log.name}"
                listed = client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
                etags |= {entry["ETag"] for entry in listed}
                time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL


def test_a_killed_run_resumes_in_a_new_folder_from_the_store(
    s3_server: S3Server, s3_bucket: str, dataset: Path, tmp_path: Path
) -> None:
    prefix = "checkpoints/finetune/run-1"
    lost = tmp_path / "lost-pod"
    lost.mkdir()
    _run_until_killed(s3_server, s3_bucket, prefix, dataset, lost)
    client = s3_server.client()
    stored = client.get_object(Bucket=s3_bucket, Key=f"{prefix}/{REMOTE_NAME}")["Body"].read()
    killed_at = _step(stored, tmp_path / "stored.ckpt")
    assert EVERY * SEEN_BEFORE_KILL <= killed_at < STEPS and killed_at % EVERY == 0

    fresh = tmp_path / "new-pod"  # nothing of the lost pod's folder
    messages: list[str] = []
    metrics: list[dict[str, float]] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    lightning_log = logging.getLogger(finetune_module.pl.utilities.rank_zero.__name__)
    lightning_log.addHandler(handler)
    try:
        result = finetune(
            dataset,
            fresh,
            MODEL,
            _settings(f"s3://{s3_bucket}/{prefix}"),
            lambda values, step: metrics.append(values),
            storage=s3_server.settings(),
        )
    finally:
        lightning_log.removeHandler(handler)

    said = " ".join(messages)
    assert f"fetched the last checkpoint from s3://{s3_bucket}/{prefix}" in said
    assert f"resuming from step {killed_at}" in said
    assert result.steps == STEPS
    assert metrics[-1]["steps_run"] == STEPS - killed_at  # only what the lost pod had not done
    # The finished run's last checkpoint is in the store too: a retry after the end of
    # training (a later failure in the step) trains nothing again.
    final = client.get_object(Bucket=s3_bucket, Key=f"{prefix}/{REMOTE_NAME}")["Body"].read()
    assert _step(final, tmp_path / "final.ckpt") == STEPS


def test_an_empty_prefix_has_no_checkpoint_and_runs_get_their_own(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    remote = RemoteCheckpoint(f"s3://{s3_bucket}/none/yet", s3_server.settings())
    assert remote.fetch(tmp_path / "last.ckpt") is False
    assert not (tmp_path / "last.ckpt").exists()
    narrowed = checkpoint_store.for_run(_settings(f"s3://{s3_bucket}/ckpt/"), "finetune/run-2")
    assert narrowed.checkpoint_uri == f"s3://{s3_bucket}/ckpt/finetune/run-2"
    untouched = PretrainSettings()
    assert checkpoint_store.for_run(untouched, "pretrain/x") is untouched
    json.dumps(narrowed.model_dump(mode="json"))  # a setting like any other: serialisable
