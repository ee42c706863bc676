# CUDA image for the GPU training steps (pretrain, finetune, evaluate).
# The base ships torch 2.14.1 (the version constraints.txt pins), so pip keeps it.
FROM pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY constraints.txt pyproject.toml README.md /src/
COPY src /src/src
COPY components /src/components
COPY pipelines /src/pipelines
RUN pip install -c /src/constraints.txt /src && rm -rf /src

RUN useradd --create-home --uid 1000 drseg
USER 1000
WORKDIR /home/drseg
ENTRYPOINT ["drseg"]
