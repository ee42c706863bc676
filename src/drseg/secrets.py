"""Credentials never leave drseg in text: `redact` masks them in anything printed, logged
or recorded (settings shown, error messages, MLflow parameters); `redact_logs` applies it
to every log record of the process.

Settings that are secrets by type (pydantic SecretStr) are masked by pydantic itself; what
this catches are credentials that users put inside URLs, the usual place for them:
``postgresql://mlflow:password@db/mlflow`` (tracking.uri), ``http://KEY:SECRET@s3-host``
(storage.endpoint_url), ``https://host/path?token=...`` (a signed or token URL).
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s'\"<>]+)@")
"""scheme://user:password@host: everything up to the last '@' of the URL, so a password
with an unencoded '@' or '/' (AWS secret keys have '/') is masked whole; a path with an '@'
is masked too, which errs on the safe side."""

_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[\w.-]*(?:password|passwd|pwd|token|secret|signature|credential|"
    r"api[_-]?key|access[_-]?key|sig)[\w.-]*)=)(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)
"""?password=..., &X-Amz-Signature=..., &token=...: query parameters that carry a secret."""


def redact(text: str) -> str:
    """`text` with every URL's user information and secret query values replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_logs() -> None:
    """From now on, every log record's message is redacted when it is made, whichever
    library logs it (a retry warning naming its URL, say); idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def redacting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return record  # arguments that do not fit: logging reports that itself
        record.msg, record.args = redact(message), None
        return record

    redacting.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting)
