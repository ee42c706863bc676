"""How the local Triton answers a request that the model code refuses: 400 (gRPC
INVALID_ARGUMENT) with one line naming the problem, never 500 with a Python traceback.

pytriton 0.7 turns every exception of the bound function into one TritonModelException for
the whole batch, which Triton answers with 500 and counts as a backend failure, so a
client's bad input would look like a broken server to the canary analysis. Its backend
stub (pytriton/proxy/model.py, run by Triton's Python backend) has no hook for this, so
`refusing_bad_requests` appends STUB_EXTENSION to the stub file that pytriton sends to
Triton when it loads the model. The extension subclasses pytriton's TritonPythonModel:

- per request, before the batch reaches drseg: an empty tensor or one with NaN or infinite
  values is answered INVALID_ARG on its own, so it cannot fail a good request that dynamic
  batching merged with it;
- for the batch: a BadRequest raised by the bound function (a side not a multiple of 32, an
  image over serve.max_input_pixels; dynamic batching merges same-shape requests only, so
  every request of the batch shares the problem) becomes INVALID_ARG with its message.

Triton counts an answered request, refused or not, as a success of the model; its failure
counters (nv_inference_request_failure) then count only the server's own failures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pytriton.models.model import Model


class BadRequest(ValueError):
    """The request is wrong, not the server: answered 400 naming the problem."""


BAD_REQUEST_LINE = f"{BadRequest.__module__}.{BadRequest.__qualname__}: "
"""How a BadRequest's message starts in the traceback pytriton forwards to its stub."""

STUB_EXTENSION = f"""

# Appended by drseg.serving.bad_requests: refused requests are answered 400, not 500.
import numpy as _drseg_np

_DRSEG_BAD_REQUEST_LINE = {BAD_REQUEST_LINE!r}


def _drseg_refusal(request, input_names):
    for name in input_names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            continue
        shape = list(tensor.shape())
        if 0 in shape:
            return (
                f"input {{name!r}}: an empty tensor (shape {{shape}}); send at least one image "
                f"with height and width above 0"
            )
        values = tensor.as_numpy()
        if values.dtype.kind == "f":
            finite = int(_drseg_np.isfinite(values).sum())
            if finite != values.size:
                return (
                    f"input {{name!r}}: {{values.size - finite}} of {{values.size}} values are "
                    f"NaN or infinite; send finite values (a photograph normalised as drseg "
                    f"predict does)"
                )
    return None


def _drseg_invalid(message):
    error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel(TritonPythonModel):
    def execute(self, triton_requests):
        refusals = [_drseg_refusal(r, list(self._model_inputs)) for r in triton_requests]
        accepted = [r for r, refusal in zip(triton_requests, refusals) if refusal is None]
        try:
            answers = iter(super().execute(accepted) if accepted else [])
        except pb_utils.TritonModelException as exc:
            lines = str(exc).splitlines()
            bad = [line for line in lines if line.startswith(_DRSEG_BAD_REQUEST_LINE)]
            if not bad:
                raise
            message = bad[-1][len(_DRSEG_BAD_REQUEST_LINE):]
            answers = iter([_drseg_invalid(message) for _ in accepted])
        return [
            next(answers) if refusal is None else _drseg_invalid(refusal) for refusal in refusals
        ]
"""


@contextlib.contextmanager
def refusing_bad_requests() -> Iterator[None]:
    """While the block runs, models that pytriton loads get STUB_EXTENSION in their stub."""
    original = Model.get_proxy_model_files

    def with_extension(model: Model) -> dict[str, bytes]:
        files = original(model)
        key = f"file:{model.model_version}/model.py"
        files[key] = files[key] + STUB_EXTENSION.encode()
        return files

    Model.get_proxy_model_files = with_extension
    try:
        yield
    finally:
        Model.get_proxy_model_files = original
