# CPU image for every non-GPU pipeline step, the MLflow server and the nightly submit CronJob.
# Build context: the repository root (images/build.sh). BuildKit sends only the COPY sources.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU torch first, from PyTorch's CPU index: the constraints pin 2.14.1, and PyPI's wheel of
# that version is the multi-GB CUDA build that a CPU image never uses.
COPY constraints.txt /src/constraints.txt
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md /src/
COPY src /src/src
COPY components /src/components
COPY pipelines /src/pipelines
# psycopg2: the MLflow tracking server (manifests/mlflow) runs this image on PostgreSQL.
RUN pip install -c /src/constraints.txt /src psycopg2-binary==2.9.13 \
    && rm -rf /src

RUN useradd --create-home --uid 1000 drseg
USER 1000
WORKDIR /home/drseg
ENTRYPOINT ["drseg"]
