"""Real servers the deploy tests start on 127.0.0.1 (S3, MLflow)."""

from tests.integration.mlflow_server import mlflow_server  # noqa: F401
from tests.integration.s3_server import s3_bucket, s3_server  # noqa: F401
