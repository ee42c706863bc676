# TensorRT engine builder (components/tensorrt.py), on a GPU node.
# A plan only loads in the TensorRT version that built it: NGC_RELEASE must equal the one in
# triton.Dockerfile (build.sh passes one value to both; tests/test_images.py checks defaults).
ARG NGC_RELEASE=26.08
FROM nvcr.io/nvidia/tensorrt:${NGC_RELEASE}-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

# The image's own `tensorrt` Python package stays; drseg and its dependencies go beside it.
COPY constraints.txt pyproject.toml README.md /src/
COPY src /src/src
COPY components /src/components
COPY pipelines /src/pipelines
RUN pip install -c /src/constraints.txt /src && rm -rf /src

RUN useradd --create-home --uid 1001 drseg
USER 1001
WORKDIR /home/drseg
