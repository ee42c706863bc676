"""Ingest reading its source from a real S3 server (SeaweedFS on 127.0.0.1)."""

from pathlib import Path

import pytest
from pydantic import SecretStr

from drseg.config import IngestSettings
from drseg.data.ingest import ingest
from drseg.data.storage import StorageError, upload_tree
from tests.integration.s3_server import S3Server

pytestmark = pytest.mark.integration


def test_ingest_from_s3_equals_ingest_from_disk(
    s3_server: S3Server, s3_bucket: str, synthetic_idrid: Path, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/idrid"
    upload_tree(synthetic_idrid, url, s3_server.settings())
    settings = IngestSettings(working_width=128, workers=2)
    remote = ingest(url, tmp_path / "remote", settings, s3_server.settings())
    local = ingest(synthetic_idrid, tmp_path / "local", settings)
    assert remote.manifest.dataset_hash == local.manifest.dataset_hash
    assert remote.summary["records"] == 4
    assert remote.manifest.records[0].source.startswith(f"{url}/A. Segmentation/")


def test_ingest_with_wrong_credentials_fails_clearly(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    wrong = s3_server.settings().model_copy(update={"secret_access_key": SecretStr("nope")})
    with pytest.raises(StorageError, match="rejected the credentials"):
        ingest(f"s3://{s3_bucket}", tmp_path / "out", IngestSettings(), wrong)
    assert not (tmp_path / "out").exists()
