#!/bin/sh
# Serve the model repository straight from S3: Triton reads s3:// itself (credentials from
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION), so the image needs no
# AWS CLI and no copy step. For an S3-compatible store (MinIO, SeaweedFS) the URI names the
# endpoint: s3://host:port/bucket/prefix. Extra arguments go to tritonserver unchanged.
set -eu
: "${MODEL_REPOSITORY_S3_URI:?set MODEL_REPOSITORY_S3_URI to the model repository, s3://[host:port/]bucket/prefix}"
case "$MODEL_REPOSITORY_S3_URI" in
  s3://*) ;;
  *) echo "triton-entrypoint: MODEL_REPOSITORY_S3_URI must start with s3:// (got $MODEL_REPOSITORY_S3_URI)" >&2
     exit 2 ;;
esac
exec tritonserver --model-repository="$MODEL_REPOSITORY_S3_URI" "$@"
