"""Storage on local folders, plus the S3 behaviour that needs no server."""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from pathlib import Path

import pytest
from pydantic import SecretStr

from drseg.config import StorageSettings
from drseg.data.storage import (
    LocalStorage,
    S3Storage,
    StorageError,
    download_tree,
    is_remote,
    open_storage,
    upload_tree,
)

FILES = {
    "b.txt": b"bee",
    "a/z.bin": bytes(range(256)),
    "a/b/c/deep.jpg": b"\xff\xd8 jpeg-ish",
    "A. Segmentation/1. Original Images/IDRiD_01.jpg": b"photo",
}


def _fill(root: Path) -> None:
    for key, data in FILES.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)


def test_round_trip_nested_keys(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "new" / "root")  # does not exist yet: writing creates it
    for key, data in FILES.items():
        storage.write_bytes(key, data)

    assert storage.list_files() == sorted(FILES)
    for key, data in FILES.items():
        assert storage.read_bytes(key) == data
        assert storage.size(key) == len(data)
    assert (tmp_path / "new/root/a/b/c/deep.jpg").read_bytes() == FILES["a/b/c/deep.jpg"]


def test_list_is_sorted_recursive_and_files_only(tmp_path: Path) -> None:
    _fill(tmp_path)
    (tmp_path / "empty" / "dir").mkdir(parents=True)

    assert open_storage(tmp_path).list_files() == [
        "A. Segmentation/1. Original Images/IDRiD_01.jpg",
        "a/b/c/deep.jpg",
        "a/z.bin",
        "b.txt",
    ]


def test_url_and_describe_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage("rel")

    assert storage.url == str(tmp_path / "rel")
    assert storage.describe("x/y.png") == str(tmp_path / "rel/x/y.png")


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = open_storage(tmp_path)
    storage.write_bytes("d/f.bin", b"old")
    storage.write_bytes("d/f.bin", b"new")

    assert storage.read_bytes("d/f.bin") == b"new"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.bin"]


def test_failed_write_keeps_old_file_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(tmp_path)
    storage.write_bytes("f.bin", b"old")

    def broken_replace(src: str | Path, dst: str | Path) -> None:
        assert Path(src).parent == Path(dst).parent  # the temp file sits next to the target
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="No space left") as caught:
        storage.write_bytes("f.bin", b"new")

    assert str(tmp_path / "f.bin") in str(caught.value)
    assert storage.read_bytes("f.bin") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(StorageError, match="no such folder") as caught:
        open_storage(missing).list_files()
    assert str(missing) in str(caught.value)


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StorageError, match="no such folder"):
        open_storage(tmp_path / "file").list_files()


@pytest.mark.parametrize("method", ["read_bytes", "size"])
def test_missing_key_names_the_full_path(tmp_path: Path, method: str) -> None:
    storage = open_storage(tmp_path)
    with pytest.raises(StorageError, match="no such file") as caught:
        getattr(storage, method)("a/missing.jpg")
    assert str(tmp_path / "a" / "missing.jpg") in str(caught.value)


@pytest.mark.parametrize("key", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", ""])
def test_keys_cannot_escape_the_root(tmp_path: Path, key: str) -> None:
    storage = open_storage(tmp_path / "root")
    with pytest.raises(StorageError, match="not a relative key"):
        storage.write_bytes(key, b"x")
    assert not (tmp_path / "escape.txt").exists()


def test_local_storage_pickles(tmp_path: Path) -> None:
    _fill(tmp_path)
    clone = pickle.loads(pickle.dumps(open_storage(tmp_path)))

    assert isinstance(clone, LocalStorage)
    assert clone.list_files() == sorted(FILES)
    assert clone.read_bytes("a/z.bin") == FILES["a/z.bin"]


def test_upload_and_download_tree_between_local_folders(tmp_path: Path) -> None:
    source, middle, target = tmp_path / "src", tmp_path / "mid", tmp_path / "dst"
    _fill(source)

    assert upload_tree(source, str(middle)) == len(FILES)
    assert download_tree(str(middle), target) == len(FILES)
    for key, data in FILES.items():
        assert (target / key).read_bytes() == data


def test_upload_tree_from_missing_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such folder"):
        upload_tree(tmp_path / "missing", str(tmp_path / "out"))


def test_is_remote() -> None:
    assert is_remote("s3://bucket/prefix")
    assert is_remote("s3://bucket")
    assert not is_remote("/data/s3://odd")
    assert not is_remote(Path("s3://bucket"))  # a Path is always a local path
    assert not is_remote("relative/folder")


def test_s3_url_parsing() -> None:
    storage = open_storage("s3://bkt/a/b/")

    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.url) == ("bkt", "a/b", "s3://bkt/a/b")
    assert storage.describe("x y/z.jpg") == "s3://bkt/a/b/x y/z.jpg"
    assert open_storage("s3://bkt").describe("k") == "s3://bkt/k"


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix"])
def test_s3_url_without_bucket_is_refused(url: str) -> None:
    with pytest.raises(StorageError, match="no bucket"):
        open_storage(url)


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(StorageError, match="unsupported URL"):
        open_storage("gs://bucket/x")


def test_unused_s3_storage_pickles_with_settings() -> None:
    settings = StorageSettings(endpoint_url="http://127.0.0.1:1", region="eu-west-1")
    clone = pickle.loads(pickle.dumps(open_storage("s3://bkt/p", settings)))

    assert isinstance(clone, S3Storage)
    assert (clone.url, clone.settings) == ("s3://bkt/p", settings)


def test_missing_s3_credentials_say_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # No credentials anywhere boto3 looks (env, files, instance metadata): it fails before
    # connecting, so no server is needed.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = open_storage("s3://bkt/p", StorageSettings(endpoint_url="http://127.0.0.1:9"))

    start = time.monotonic()
    with pytest.raises(StorageError, match="no S3 credentials") as caught:
        storage.read_bytes("k")
    assert time.monotonic() - start < 5
    assert "s3://bkt/p/k" in str(caught.value)
    assert "AWS_ACCESS_KEY_ID" in str(caught.value)
    assert "storage.access_key_id" in str(caught.value)


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unreachable_s3_endpoint_error_does_not_print_the_credentials_in_its_url() -> None:
    endpoint = f"http://AKIAEXAMPLE:wJalr%2FtopSECRET@127.0.0.1:{_free_port()}"
    settings = StorageSettings(
        endpoint_url=endpoint,
        access_key_id=SecretStr("AKIAEXAMPLE"),
        secret_access_key=SecretStr("wJalr/topSECRET"),
    )
    with pytest.raises(StorageError) as raised:
        open_storage("s3://bucket/prefix", settings).list_files()
    shown = "".join(traceback.format_exception(raised.value))
    assert "cannot reach S3 endpoint http://***@127.0.0.1" in shown
    for secret in ("topSECRET", "AKIAEXAMPLE"):
        assert secret not in shown


def test_unsupported_url_error_masks_its_credentials() -> None:
    with pytest.raises(StorageError) as raised:
        open_storage("https://user:hunter2@example.invalid/data")
    assert "hunter2" not in str(raised.value)
    assert "https://***@example.invalid/data" in str(raised.value)
