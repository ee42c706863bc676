"""Output agreement of two Triton servers: do they draw the same lesions on the same photographs?

The canary rollout's last check, between the stable and the canary track. Each server is asked
which version of the model it serves (Triton's model metadata) and is then queried exactly as
`drseg predict` would query it, with that version's own serving contract (working width,
CLAHE, normalisation, thresholds), so the masks compared are what a user of each track gets.

Agreement is Dice per lesion class between the canary's masks and stable's (the reference),
pooled over all probe photographs (sums of TP, FP and FN, like the dataset-level Dice of
evaluation); the lowest class is returned, so a canary that loses the microaneurysms cannot
pass on the strength of agreeing exudates. A class that both servers leave empty agrees
perfectly (1.0): nothing found by either is the same answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from drseg.contract import ServingContract
from drseg.data.validation import IMAGE_SUFFIXES
from drseg.evaluate.metrics import dice_iou
from drseg.serving.client import Masks, TritonModel, prepare_photograph, served_masks

ContractFn = Callable[[str], ServingContract]
"""A served version -> its serving contract (e.g. from the registry's model.onnx)."""


def probe_photographs(folder: Path) -> list[Path]:
    """The photographs in `folder`, sorted: the fixed probe set."""
    folder = Path(folder)
    files = folder.iterdir() if folder.is_dir() else iter(())
    found = sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(
            f"{folder}: no photographs ({', '.join(IMAGE_SUFFIXES)}); put a few fundus "
            "photographs there (`drseg synth --n 8 --out probes` writes some to probes/images)"
        )
    return found


def _served(
    url: str, model_name: str, contract_for: ContractFn, timeout_s: float
) -> tuple[TritonModel, ServingContract]:
    """The model at `url` pinned to the newest version it serves, and that version's contract."""
    any_version = TritonModel(url, "http", model_name, "", timeout_s)
    try:
        versions = [str(v) for v in any_version.metadata().get("versions") or []]
    finally:
        any_version.close()
    if not versions:
        raise ValueError(
            f"{url}: Triton serves no version of {model_name!r}; check the track's pods "
            "(kubectl logs) and serve.model_name"
        )
    version = max(versions, key=int)
    return TritonModel(url, "http", model_name, version, timeout_s), contract_for(version)


def _masks(model: TritonModel, contract: ServingContract, photo: Path) -> Masks:
    prepared = prepare_photograph(photo, contract)
    output = model.infer(contract.input_name, prepared.model_input[None], contract.output_name)
    return served_masks(output, prepared, contract)


def _counts(reference: Masks, other: Masks) -> npt.NDArray[np.int64]:
    """(C, 3): TP, FP and FN of `other` against `reference`, per class."""
    if other.shape != reference.shape:
        # The versions' working widths differ: compare at the reference's size.
        size = (reference.shape[2], reference.shape[1])
        other = np.stack(
            [cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) for m in other]
        ).astype(bool)
    tp = (reference & other).sum(axis=(1, 2))
    return np.stack([tp, other.sum(axis=(1, 2)) - tp, reference.sum(axis=(1, 2)) - tp], axis=1)


def mask_agreement(
    photos: Sequence[Path],
    stable_url: str,
    canary_url: str,
    contract_for: ContractFn,
    model_name: str = "drseg",
    timeout_s: float = 120.0,
) -> float:
    """Lowest per-class Dice between the canary's and stable's masks over `photos`; the URLs
    are host:port of each server's HTTP endpoint."""
    with contextlib.ExitStack() as stack:
        tracks = []
        for url in (stable_url, canary_url):
            model, contract = _served(url, model_name, contract_for, timeout_s)
            stack.callback(model.close)
            tracks.append((model, contract))
        classes = [contract.classes for _, contract in tracks]
        if classes[0] != classes[1]:
            raise ValueError(
                f"stable segments {classes[0]}, the canary {classes[1]}: their masks cannot be "
                "compared; a model with other classes needs a new rollout plan, not a canary"
            )
        counts = np.zeros((len(classes[0]), 3), np.int64)
        for photo in photos:
            stable, canary = (_masks(model, contract, photo) for model, contract in tracks)
            counts += _counts(stable, canary)
    return min(dice_iou(int(tp), int(fp), int(fn), empty=1.0)[0] for tp, fp, fn in counts)
