"""`drseg probe`: the canary check no metric has, run as a Job step of the Rollout's analysis.

On a fixed labelled probe set (a `drseg ingest` dataset: photographs and lesion masks):
(1) the canary serves exactly the version that passed the gate: it says it serves that
version, and its probabilities equal ONNX Runtime's on the registered graph of the version
within `rollout.probe_tolerance`, on the same input (a wrong repository or a bad TensorRT
build shows here; preprocessing runs in the client from the registered graph's contract,
the same for both sides); (2) its Dice against the masks, per lesion class and pooled over
the probe set, is no more than `rollout.max_dice_drop` below stable's. A retrained model
may draw other lesions than stable: it is judged against the truth, not against stable's
masks. Each track is queried exactly as `drseg predict` queries it, with its own version's
serving contract. An unreachable canary fails; so does an unreachable stable, since the
canary cannot then be compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from drseg.config import RolloutSettings
from drseg.contract import ServingContract, read_contract
from drseg.data.dataset import image_path, load_manifest, mask_path, read_mask
from drseg.errors import UserError
from drseg.evaluate.metrics import dice_iou
from drseg.serving.client import Masks, TritonModel, prepare_photograph, served_masks

GraphFn = Callable[[str], Path]
"""A registry version -> its registered model.onnx (drseg.registry.download_onnx)."""


class ProbeError(UserError, RuntimeError):
    """The probe could not run (probe set, registry); not a verdict on the canary."""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    """One line: what was checked and, on failure, which check failed and by how much."""


@dataclass(frozen=True)
class ProbeCase:
    photo: Path
    truth: dict[str, Masks]
    """Class -> (H, W) bool; a class without a mask file is all-negative (as IDRiD scores)."""


def load_probe_set(root: Path) -> list[ProbeCase]:
    """The photographs and masks of a `drseg ingest` dataset at `root`, in manifest order."""
    manifest = load_manifest(root)
    if not manifest.records:
        raise ProbeError(f"{root}: the probe set has no photographs; ingest a labelled set")
    cases = []
    for record in manifest.records:
        truth = {cls: read_mask(mask_path(root, cls, record.id)) for cls in record.masks}
        cases.append(ProbeCase(image_path(root, record.id), truth))
    return cases


class _Unreachable(Exception):
    """A track did not answer: a verdict, not an error of the probe."""


@dataclass(frozen=True)
class _Track:
    name: str
    model: TritonModel
    version: str
    graph: Path
    """The registered model.onnx of `version`."""
    contract: ServingContract


def _served_versions(url: str, model_name: str, timeout_s: float) -> list[str]:
    client = TritonModel(url, "http", model_name, "", timeout_s)
    try:
        return [str(v) for v in client.metadata().get("versions") or []]
    except Exception as exc:  # tritonclient raises its own and socket errors alike
        raise _Unreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
    finally:
        client.close()


def _truth(case: ProbeCase, classes: tuple[str, ...], shape: tuple[int, int]) -> Masks:
    """(C, H, W) masks at the served masks' size (nearest-neighbour where sizes differ)."""
    height, width = shape
    layers = []
    for cls in classes:
        mask = case.truth.get(cls)
        if mask is None:
            layers.append(np.zeros(shape, bool))
        elif mask.shape != shape:
            resized = cv2.resize(
                mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST
            )
            layers.append(resized.astype(bool))
        else:
            layers.append(mask)
    return np.stack(layers)


def _counts(truth: Masks, found: Masks) -> npt.NDArray[np.int64]:
    """(C, 3): TP, FP, FN per class."""
    tp = (truth & found).sum(axis=(1, 2))
    return np.stack([tp, found.sum(axis=(1, 2)) - tp, truth.sum(axis=(1, 2)) - tp], axis=1)


def _dice(counts: npt.NDArray[np.int64]) -> list[float]:
    return [dice_iou(*(int(n) for n in row))[0] for row in counts]


@contextlib.contextmanager
def _tracks(
    canary_url: str,
    stable_url: str,
    version: str,
    graph_for: GraphFn,
    model_name: str,
    timeout_s: float,
) -> Iterator[tuple[_Track, _Track]]:
    served = _served_versions(canary_url, model_name, timeout_s)
    if version not in served:
        raise _Unreachable(
            f"the canary at {canary_url} serves versions {served} of {model_name!r}, not "
            f"{version}: check the Rollout's repository URI (drseg rollout status)"
        )
    stable_versions = _served_versions(stable_url, model_name, timeout_s)
    if not stable_versions:
        raise _Unreachable(f"stable at {stable_url} serves no version of {model_name!r}")
    stable_version = max(stable_versions, key=int)
    with contextlib.ExitStack() as stack:
        tracks = []
        for name, url, served_version in (
            ("canary", canary_url, version),
            ("stable", stable_url, stable_version),
        ):
            model = TritonModel(url, "http", model_name, served_version, timeout_s)
            stack.callback(model.close)
            graph = graph_for(served_version)
            tracks.append(_Track(name, model, served_version, graph, read_contract(graph)))
        yield tracks[0], tracks[1]


def _infer(track: _Track, model_input: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    contract = track.contract
    try:
        return track.model.infer(contract.input_name, model_input[None], contract.output_name)
    except Exception as exc:
        raise _Unreachable(f"{track.name} failed a probe request: {exc}") from exc


def probe(
    cases: list[ProbeCase],
    version: str,
    graph_for: GraphFn,
    settings: RolloutSettings,
    model_name: str = "drseg",
) -> Verdict:
    """Both checks on every probe photograph; the first failed check is the verdict."""
    try:
        with _tracks(
            settings.canary_url,
            settings.stable_url,
            version,
            graph_for,
            model_name,
            settings.probe_timeout_s,
        ) as (canary, stable):
            if canary.contract.classes != stable.contract.classes:
                return Verdict(
                    False,
                    f"canary segments {canary.contract.classes}, stable "
                    f"{stable.contract.classes}: not comparable by a canary",
                )
            graph = ort.InferenceSession(str(canary.graph), providers=["CPUExecutionProvider"])
            classes = canary.contract.classes
            counts = {
                track.name: np.zeros((len(classes), 3), np.int64) for track in (canary, stable)
            }
            worst, worst_photo = 0.0, ""
            for case in cases:
                for track in (canary, stable):
                    prepared = prepare_photograph(case.photo, track.contract)
                    output = _infer(track, prepared.model_input)
                    if track is canary:
                        contract = canary.contract
                        (offline,) = graph.run(
                            [contract.output_name],
                            {contract.input_name: prepared.model_input[None]},
                        )
                        diff = float(np.abs(output - np.asarray(offline)).max())
                        if diff > worst:
                            worst, worst_photo = diff, case.photo.name
                    masks = served_masks(output, prepared, track.contract)
                    truth = _truth(case, classes, (masks.shape[1], masks.shape[2]))
                    counts[track.name] += _counts(truth, masks)
    except _Unreachable as exc:
        return Verdict(False, str(exc))
    if worst > settings.probe_tolerance:
        return Verdict(
            False,
            f"(1) version {version} on the canary differs from its registered graph by up to "
            f"{worst:.4f} (> {settings.probe_tolerance:g}) on {worst_photo}: a wrong repository "
            "or a bad TensorRT build",
        )
    dice = {name: _dice(c) for name, c in counts.items()}
    table = ", ".join(
        f"{cls} {c:.3f}/{s:.3f}"
        for cls, c, s in zip(classes, dice["canary"], dice["stable"], strict=True)
    )
    drops = [s - c for c, s in zip(dice["canary"], dice["stable"], strict=True)]
    worst_class = int(np.argmax(drops))
    if drops[worst_class] > settings.max_dice_drop:
        return Verdict(
            False,
            f"(2) {classes[worst_class]} Dice {dice['canary'][worst_class]:.3f} is "
            f"{drops[worst_class]:.3f} below stable's (version {stable.version}; > "
            f"{settings.max_dice_drop:g}); Dice canary/stable: {table}",
        )
    return Verdict(
        True,
        f"version {version} serves its registered graph (max |diff| {worst:.2g} <= "
        f"{settings.probe_tolerance:g}) and is within {settings.max_dice_drop:g} Dice of "
        f"stable version {stable.version} on {len(cases)} photographs; Dice canary/stable: {table}",
    )
