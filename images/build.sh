#!/usr/bin/env bash
# Build the four images from the repository root (`make images`).
# Tags follow components/__init__.py: ghcr.io/drseg/<name>:<drseg version>.
# Override REGISTRY or NGC_RELEASE in the environment; NGC_RELEASE goes to the TensorRT and
# the Triton build alike, so a plan built by one always loads in the other.
set -euo pipefail

cd "$(dirname "$0")/.."
REGISTRY="${REGISTRY:-ghcr.io/drseg}"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' src/drseg/__init__.py)"
NGC_RELEASE="${NGC_RELEASE:-$(sed -n 's/^ARG NGC_RELEASE=//p' images/triton.Dockerfile)}"
IMAGES=(runtime trainer tensorrt triton)

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    echo "images/build.sh: no running Docker engine here; build on a machine with Docker" \
         "(the Dockerfiles are images/<name>.Dockerfile, context: the repository root)." >&2
    exit 1
fi

# BuildKit sends only the COPY sources from the context, not the multi-GB .venv.
export DOCKER_BUILDKIT=1
for name in "${IMAGES[@]}"; do
    echo "== ${REGISTRY}/${name}:${VERSION}"
    docker build --file "images/${name}.Dockerfile" --build-arg "NGC_RELEASE=${NGC_RELEASE}" \
        --tag "${REGISTRY}/${name}:${VERSION}" .
done
