"""`drseg publish` into a real S3 server (SeaweedFS, tests/integration/s3_server.py), and
into a local folder (the same Storage interface)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drseg.cli import main
from drseg.config import ServeSettings
from drseg.deploy.publish import MARKER, PublishError, publish, version_files
from drseg.serving.repository import write_repository
from tests.integration.s3_server import S3Server
from tests.serving import VERSION

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Triton repository with two versions, of which one is published."""
    from tests.export import INGEST
    from tests.serving import export_tiny

    work = tmp_path_factory.mktemp("publish")
    onnx_path = export_tiny(work / "export", INGEST, version=None)
    for version in (VERSION, VERSION + 1):
        write_repository(work / "repo", onnx_path, version, ServeSettings())
    return work / "repo"


def _objects(s3: S3Server, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_publish_to_s3_stages_then_marks_and_is_idempotent(
    repository: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    template = f"s3://{s3_bucket}/triton/{{version}}"
    published = publish(repository, "drseg", VERSION, template, s3_server.settings())
    assert not published.already
    assert published.uri == f"s3://{s3_bucket}/triton/{VERSION}"
    objects = _objects(s3_server, s3_bucket)
    final = {
        k.removeprefix(f"triton/{VERSION}/"): v
        for k, v in objects.items()
        if k.startswith(f"triton/{VERSION}/")
    }
    # Only this version's folder and the model config, byte for byte, then the marker.
    local = version_files(repository, "drseg", VERSION)
    assert set(final) == {*local, MARKER}
    assert f"drseg/{VERSION + 1}/model.onnx" not in final
    for key, path in local.items():
        assert final[key] == path.read_bytes()
    assert json.loads(final[MARKER])["files"] == published.files
    staged = {k for k in objects if k.startswith(f"triton/{VERSION}.partial-")}
    assert {k.split("/", 2)[2] for k in staged} == set(local)

    again = publish(repository, "drseg", VERSION, template, s3_server.settings())
    assert again.already and again.files == published.files
    assert _objects(s3_server, s3_bucket) == objects  # nothing written


def test_a_published_version_is_never_replaced(
    repository: Path, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    template = f"s3://{s3_bucket}/immutable/{{version}}"
    publish(repository, "drseg", VERSION, template, s3_server.settings())
    other = tmp_path / "repo"
    write_repository(
        other,
        repository / "drseg" / str(VERSION) / "model.onnx",
        VERSION,
        ServeSettings(instance_count=2),
    )
    with pytest.raises(PublishError, match="already published with other files"):
        publish(other, "drseg", VERSION, template, s3_server.settings())


def test_without_a_marker_nothing_is_published(repository: Path, tmp_path: Path) -> None:
    """An interrupted publish (files, no marker) is published again in full."""
    target = tmp_path / "store" / str(VERSION)
    (target / "drseg").mkdir(parents=True)
    (target / "drseg" / "config.pbtxt").write_text("half-written")
    published = publish(repository, "drseg", VERSION, str(tmp_path / "store" / "{version}"))
    assert not published.already
    assert (target / MARKER).is_file()
    assert (target / "drseg" / "config.pbtxt").read_bytes() == (
        repository / "drseg" / "config.pbtxt"
    ).read_bytes()


def test_a_plan_on_cpu_instances_is_refused(repository: Path, tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a real engine")
    onnx_path = repository / "drseg" / str(VERSION) / "model.onnx"
    write_repository(tmp_path / "repo", onnx_path, VERSION, ServeSettings(), plan_path=plan)
    # write_repository puts plans on KIND_GPU; a hand-edited config may not.
    config = tmp_path / "repo" / "drseg" / "config.pbtxt"
    config.write_text(config.read_text().replace("KIND_GPU", "KIND_CPU"))
    with pytest.raises(PublishError, match=r"non-GPU instance group.*`drseg repository`"):
        publish(tmp_path / "repo", "drseg", VERSION, str(tmp_path / "store" / "{version}"))


def test_cli_publish(
    repository: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DRSEG_ROLLOUT__REPOSITORY_URI", str(tmp_path / "store" / "{version}"))
    main(["publish", "--version", str(VERSION), "--repository", str(repository)])
    assert "published version 3" in capsys.readouterr().out
    main(["publish", "--version", str(VERSION), "--repository", str(repository)])
    assert "already published" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["publish", "--version", "9", "--repository", str(repository)])
    assert exited.value.code == 2
    assert "no version 9" in capsys.readouterr().err
