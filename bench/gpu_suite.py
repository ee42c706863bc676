"""drseg measured on one GPU, in one command: every figure into one JSON and a Markdown table.

Sections, run in this order, each under its own try (one failure loses only its figures),
and each skipped, with the reason, when the deadline leaves too little time for it:

1. finetune: images/s of the fine-tune stage as the pipeline runs it (`finetune()`, patches
   drawn on the device) next to a plain PyTorch loop of the same model on resident tensors
   (same batch, precision, channels-last, masked-reconstruction copy), in the same run;
2. pretrain: SimCLR views/s of the pretrain stage next to a plain loop, the same way;
3. quality: the GPU profile (configs/idrid.yaml's model and recipe, random encoder) trained
   on the IDRiD train split for a fixed time budget, exported and evaluated on the validation
   split exactly as the pipeline's steps do (ONNX graph, whole photographs, cross-fitted
   thresholds); per-class AUPR and Dice. With --photographs, the served graph's per-class
   probabilities for each photograph there, as 8-bit PNGs at the photograph's own size
   (<stem>_<CLASS>.png, 0..255 = 0..1, zero outside the field of view) for an external scorer;
4. inference_modes: the quality run's model scored on the same validation photographs, by
   the same cross-fitted evaluation, in other inference modes than the served one (PyTorch
   whole image, with flip averaging, Gaussian-tiled, tiled with flips): does serving leave
   accuracy on the table?
5. inference: whole photographs at the working size, PyTorch eager vs torch.compile vs ONNX
   Runtime (and TensorRT where importable);
6. finetune_compiled: the fine-tune stage with finetune.compile (torch.compile).

    python bench/gpu_suite.py --idrid PATH/TO/IDRID --out DIR [--photographs DIR]
    python bench/gpu_suite.py --tiny --out DIR     # CPU, synthetic, ~1 minute: run by make test

`make bench-gpu` runs it on a machine with a GPU; bench/gpu_prepare.sh packs the wheels and the
data for a GPU machine without network access (see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drseg import atomic
from drseg.config import (
    ClaheSettings,
    EvaluateSettings,
    ExportSettings,
    FinetuneSettings,
    IngestSettings,
    ModelSettings,
    PretrainSettings,
    RegistrySettings,
    TrackingSettings,
)
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.evaluate.served import ServedGraph
from drseg.models.unet import load_trained_model
from drseg.steps import evaluate_step, export_step, finetune_step
from drseg.train.finetune import LOG_EVERY, finetune
from drseg.train.pretrain import pretrain
from pretrain_throughput import plain_loop as pretrain_plain_loop
from train_throughput import plain_loop as finetune_plain_loop

JSON_FILE = "gpu_suite.json"
TABLE_FILE = "gpu_suite.md"
PROBABILITIES_DIR = "probabilities"


@dataclass(frozen=True)
class Profile:
    """What one run of the suite trains and measures."""

    width: int
    encoder: str
    patch: int
    batch: int
    precision: str
    timed_steps: int
    """Steps of each throughput run."""
    warmup_steps: int
    """Steps of each throughput run that are not timed (a logged step: 1 or LOG_EVERY)."""
    pretrain_crop: int
    pretrain_batch: int
    pretrain_steps: int
    pretrain_workers: int
    train_budget_s: float
    """Training time of the quality run."""
    inference_repeats: int
    compile: bool
    lr: float = 5e-4
    warmup_fraction: float = 0.05


GPU = Profile(
    width=2048,  # configs/idrid.yaml
    encoder="resnet34",
    patch=512,
    batch=16,
    precision="bf16-mixed",
    timed_steps=60,
    warmup_steps=LOG_EVERY,
    pretrain_crop=384,
    pretrain_batch=128,
    pretrain_steps=30,
    pretrain_workers=12,
    train_budget_s=180.0,
    inference_repeats=10,
    compile=True,
)
TINY = Profile(
    width=256,
    encoder="resnet18",
    patch=64,
    batch=2,
    precision="32-true",
    timed_steps=LOG_EVERY + 1,
    warmup_steps=1,
    pretrain_crop=64,
    pretrain_batch=4,
    pretrain_steps=LOG_EVERY + 1,
    pretrain_workers=0,
    train_budget_s=5.0,
    inference_repeats=2,
    compile=False,
    lr=1e-3,
)


@dataclass
class Context:
    profile: Profile
    work: Path
    dataset: Path
    """Ingest-stage dataset (what evaluation scores)."""
    enhanced: Path
    """CLAHE-stage dataset (what training reads)."""
    photographs: Path | None
    out: Path
    device: str
    figures: dict[str, Any] = field(default_factory=dict)
    """Figures a later section reads (e.g. the stage's steps/s for the quality budget)."""

    def model(self) -> ModelSettings:
        return ModelSettings(encoder=self.profile.encoder)

    def finetune(self, **changes: Any) -> FinetuneSettings:
        profile = self.profile
        settings = FinetuneSettings(
            patch_size=profile.patch,
            batch_size=profile.batch,
            precision=profile.precision,  # type: ignore[arg-type]
            lr=profile.lr,
            max_steps=profile.timed_steps,
            warmup_steps=profile.warmup_steps,
            checkpoint_every=10**6,
        )
        return settings.model_copy(update=changes)


class StepClock:
    """A `log_metrics` callback that notes when each logged step ended; the logged figures
    read the loss, so the device has finished the step by then."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.marks: list[tuple[int, float]] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if "images_per_second" not in metrics:  # the run's closing summary
            self.marks.append((step, time.perf_counter()))

    def per_second(self, items_per_step: int) -> float:
        """Items/s between the end of the warm-up steps and the last logged step."""
        marks = [(s, t) for s, t in self.marks if s >= self.warmup_steps]
        if len(marks) < 2:
            raise RuntimeError(f"too few logged steps to time ({self.marks}); raise timed_steps")
        (s0, t0), (s1, t1) = marks[0], marks[-1]
        return (s1 - s0) * items_per_step / (t1 - t0)


def _stage_rate(ctx: Context, name: str, settings: FinetuneSettings) -> float:
    clock = StepClock(ctx.profile.warmup_steps)
    finetune(ctx.enhanced, ctx.work / name, ctx.model(), settings, log_metrics=clock)
    return clock.per_second(settings.batch_size)


def section_finetune(ctx: Context) -> dict[str, Any]:
    settings = ctx.finetune()
    plain = finetune_plain_loop(ctx.model(), settings, ctx.profile.timed_steps)
    stage = _stage_rate(ctx, "finetune-throughput", settings)
    ctx.figures["stage_steps_per_second"] = stage / settings.batch_size
    return {
        "plain_loop_images_per_second": plain,
        "stage_images_per_second": stage,
        "stage_vs_plain": stage / plain,
        "reconstruction_input": settings.reconstruction_input,
    }


def section_pretrain(ctx: Context) -> dict[str, Any]:
    profile = ctx.profile
    settings = PretrainSettings(
        crop_size=profile.pretrain_crop,
        batch_size=profile.pretrain_batch,
        max_steps=profile.pretrain_steps,
        warmup_steps=1,
        checkpoint_every=10**6,
        num_workers=profile.pretrain_workers,
        precision=profile.precision,  # type: ignore[arg-type]
    )
    plain = pretrain_plain_loop(ctx.model(), settings, profile.pretrain_steps)
    clock = StepClock(profile.warmup_steps)
    pretrain([ctx.enhanced], ctx.work / "pretrain", ctx.model(), settings, log_metrics=clock)
    stage = clock.per_second(2 * settings.batch_size)
    return {
        "plain_loop_views_per_second": plain,
        "stage_views_per_second": stage,
        "stage_vs_plain": stage / plain,
        "workers": settings.num_workers,
    }


def write_probabilities(graph: ServedGraph, photographs: Path, out: Path) -> int:
    """The graph's per-class probabilities of each photograph in `photographs` as 8-bit PNGs
    at the photograph's own size; returns how many photographs were written."""
    from drseg.serving.client import prepare_photograph

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in photographs.iterdir() if p.suffix.lower() in {".jpg", ".png", ".tif"})
    for photo in files:
        probabilities, fov = graph.probabilities(photo)
        width, height = prepare_photograph(photo, graph.contract).source_size
        for cls, plane in zip(graph.classes, probabilities * fov, strict=True):
            grey = np.clip(plane * 255 + 0.5, 0, 255).astype(np.uint8)
            full = cv2.resize(grey, (width, height), interpolation=cv2.INTER_LINEAR)
            atomic.write_bytes(out / f"{photo.stem}_{cls}.png", cv2.imencode(".png", full)[1])
    return len(files)


def section_quality(ctx: Context) -> dict[str, Any]:
    profile = ctx.profile
    rate = ctx.figures.get("stage_steps_per_second")
    steps = max(LOG_EVERY, int(profile.train_budget_s * rate)) if rate else 4 * LOG_EVERY
    steps = ctx.figures.get("quality_steps", steps)
    settings = ctx.finetune(
        max_steps=steps,
        warmup_steps=max(1, int(profile.warmup_fraction * steps)),
        checkpoint_every=max(1, steps // 4),
    )
    tracking = TrackingSettings(enabled=False)
    model_dir, onnx_dir = ctx.work / "model", ctx.work / "onnx"
    started = time.perf_counter()
    trained = finetune_step(ctx.enhanced, model_dir, ctx.model(), settings, tracking, ctx.work, "")
    train_seconds = time.perf_counter() - started
    ingest_settings = IngestSettings(working_width=profile.width)
    export_step(
        model_dir, ctx.enhanced, onnx_dir, ExportSettings(), ingest_settings, ClaheSettings()
    )
    started = time.perf_counter()
    outcome = evaluate_step(
        onnx_dir,
        ctx.dataset,
        ctx.work / "evaluation",
        ctx.work / "served",
        EvaluateSettings(),
        RegistrySettings(),
        tracking,
        ctx.work,
        "",
    )
    metrics = outcome.metrics
    figures: dict[str, Any] = {
        "steps": steps,
        "train_seconds": train_seconds,
        "train_images_per_second": trained.get("images_per_second"),
        "evaluate_seconds": time.perf_counter() - started,
        "photographs": metrics.images,
        "merged_dice": metrics.merged.dice,
        "mean_aupr": metrics.mean_aupr,
        "per_class": {
            cls: {"aupr": row.aupr, "dice": row.dice, "idrid_best_aupr": row.idrid_best_aupr}
            for cls, row in metrics.classes.items()
        },
        "encoder_init": "random (SimCLR does not fit the budget)",
    }
    ctx.figures["weights"] = model_dir / "model.pt"
    ctx.figures["served"] = ctx.work / "served" / "model.onnx"
    if ctx.photographs is not None:
        graph = ServedGraph(ctx.work / "served" / "model.onnx")
        out = ctx.out / PROBABILITIES_DIR
        figures["probability_pngs"] = write_probabilities(graph, ctx.photographs, out)
    return figures


TILE = 512
"""Tile side of the tiled modes: the GPU profile's patch size (what the model trained on)."""


def torch_runner(
    network: torch.nn.Module, device: str, tile: int | None, flips: bool
) -> Callable[[np.ndarray], np.ndarray]:
    """A ServedGraph runner ((1, 3, H, W) model input -> (1, C, H, W) probabilities) that runs
    the trained network in PyTorch (fp32): the whole image or Gaussian-weighted tiles, each
    optionally averaged over the four flips."""
    from drseg.evaluate.tiling import predict_probabilities

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return network(batch)[0]

    def run(batch: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(batch[0])
        side = tile or max(image.shape[1:])
        probs = predict_probabilities(logits, image, side, 0.5, 4, flips, device)
        return probs.numpy()[None]

    return run


def section_inference_modes(ctx: Context) -> dict[str, Any]:
    from drseg.evaluate.report import evaluate_dataset
    from drseg.evaluate.served import SCORED

    served = ctx.figures.get("served")
    if served is None:
        raise RuntimeError("no trained model: the quality section did not finish")
    network = load_trained_model(ctx.figures["weights"], ctx.model(), ctx.device)
    tile = min(TILE, ctx.profile.patch * 2)
    modes = {
        "served (ONNX Runtime, whole image)": None,
        "pytorch whole image": torch_runner(network, ctx.device, None, False),
        "pytorch whole image + flips": torch_runner(network, ctx.device, None, True),
        f"pytorch tiles {tile}": torch_runner(network, ctx.device, tile, False),
        f"pytorch tiles {tile} + flips": torch_runner(network, ctx.device, tile, True),
    }
    figures: dict[str, Any] = {}
    for name, runner in modes.items():
        started = time.perf_counter()
        graph = ServedGraph(served, runner)
        out = ctx.work / "modes" / name.replace(" ", "-").replace("(", "").replace(")", "")
        settings = EvaluateSettings(overlays=0)  # figures only: the quality run drew them
        metrics = evaluate_dataset(graph, ctx.dataset, out, settings, SCORED).metrics
        row = {f"aupr_{c}": m.aupr for c, m in metrics.classes.items()}
        row.update({f"dice_{c}": m.dice for c, m in metrics.classes.items()})
        figures[name] = {
            "merged_dice": metrics.merged.dice,
            **row,
            "seconds": time.perf_counter() - started,
        }
    return figures


def _timed(run: Callable[[], Any], repeats: int, sync: bool) -> float:
    """Images/s of `run` (one photograph per call) after one warm-up call."""
    run()
    if sync:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    if sync:
        torch.cuda.synchronize()
    return repeats / (time.perf_counter() - started)


def section_inference(ctx: Context) -> dict[str, Any]:
    from drseg.evaluate.served import onnx_runner
    from drseg.serving.client import prepare_photograph

    served = ctx.figures.get("served")
    if served is None:
        raise RuntimeError("no trained model: the quality section did not finish")
    graph = ServedGraph(served)
    photo = next(p for p in sorted((ctx.dataset / "images").iterdir()))
    batch = prepare_photograph(photo, graph.contract).model_input[None]
    cuda = ctx.device == "cuda"
    network = load_trained_model(ctx.figures["weights"], ctx.model(), ctx.device)
    network = network.to(memory_format=torch.channels_last)
    tensor = torch.from_numpy(batch).to(ctx.device).contiguous(memory_format=torch.channels_last)
    bf16 = ctx.profile.precision == "bf16-mixed"

    def infer(model: Callable[[torch.Tensor], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode(), torch.autocast(ctx.device, torch.bfloat16, enabled=bf16):
                return torch.sigmoid(model(tensor)[0])

        return run

    repeats = ctx.profile.inference_repeats
    figures: dict[str, Any] = {"input_shape": list(batch.shape), "precision": ctx.profile.precision}
    figures["eager_images_per_second"] = _timed(infer(network), repeats, cuda)
    if ctx.profile.compile:
        started = time.perf_counter()
        compiled = torch.compile(network)
        figures["compiled_images_per_second"] = _timed(infer(compiled), repeats, cuda)
        figures["compile_seconds_with_timing"] = time.perf_counter() - started
    runner = onnx_runner(served, graph.contract)
    figures["onnxruntime_images_per_second"] = _timed(lambda: runner(batch), min(repeats, 3), False)
    figures["onnxruntime_provider"] = "CPUExecutionProvider (the build the machine has)"
    try:
        import tensorrt  # noqa: F401

        figures["tensorrt"] = "importable, not measured by this suite yet"
    except ImportError:
        figures["tensorrt"] = "not importable on this machine"
    return figures


def section_finetune_compiled(ctx: Context) -> dict[str, Any]:
    settings = ctx.finetune(compile=True, max_steps=ctx.profile.timed_steps + 2 * LOG_EVERY)
    started = time.perf_counter()
    stage = _stage_rate(ctx, "finetune-compiled", settings)
    return {
        "stage_images_per_second": stage,
        "run_seconds_with_compile": time.perf_counter() - started,
    }


SECTIONS: list[tuple[str, Callable[[Context], dict[str, Any]], float, bool]] = [
    ("finetune", section_finetune, 30.0, False),
    ("pretrain", section_pretrain, 30.0, False),
    ("quality", section_quality, 90.0, False),
    ("inference_modes", section_inference_modes, 60.0, False),
    ("inference", section_inference, 30.0, False),
    ("finetune_compiled", section_finetune_compiled, 120.0, True),
]
"""(name, function, seconds it needs at least besides the quality run's training budget,
needs torch.compile)."""


def prepare_data(args: argparse.Namespace, profile: Profile, work: Path) -> tuple[Path, Path]:
    """The ingest- and CLAHE-stage datasets: IDRiD (--idrid) or, in --tiny, synthetic."""
    source = work / "source"
    if args.tiny:
        write_synthetic_dataset(source, n=8, seed=0, width=profile.width)
    else:
        source = Path(args.idrid)
    # The tiny run's eight photographs take less time than a worker pool takes to start.
    workers = 1 if args.tiny else None
    settings = IngestSettings(
        working_width=profile.width, val_fraction=0.2, split_seed=0, workers=workers
    )
    ingest(source, work / "ingested", settings)
    clahe_dataset(work / "ingested", work / "clahe", ClaheSettings(workers=workers))
    return work / "ingested", work / "clahe"


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(results: dict[str, Any]) -> str:
    """The figures as one table per section, for bench/RESULTS.md."""
    lines = [f"machine: {json.dumps(results['machine'])}", ""]
    for name, figures in results["sections"].items():
        lines += [f"### {name}", "", "| figure | value |", "|---|---|"]
        for key, value in figures.items():
            if isinstance(value, dict):
                nested = all(isinstance(row, dict) for row in value.values())
                for label, row in value.items() if nested else [(key, value)]:
                    shown = ", ".join(f"{k} {_number(v)}" for k, v in row.items())
                    lines.append(f"| {label} | {shown} |")
            elif key != "traceback":
                lines.append(f"| {key} | {_number(value)} |")
        lines.append("")
    return "\n".join(lines)


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    profile = TINY if args.tiny else GPU
    if args.budget is not None:
        profile = Profile(**{**asdict(profile), "train_budget_s": args.budget})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "profile": asdict(profile), "sections": {}}

    def save() -> None:
        results["seconds"] = time.perf_counter() - started
        atomic.write_text(out / JSON_FILE, json.dumps(results, indent=2, default=str) + "\n")
        atomic.write_text(out / TABLE_FILE, markdown(results))

    with tempfile.TemporaryDirectory(prefix="drseg-gpu-suite-") as tmp:
        work = Path(tmp)
        dataset, enhanced = prepare_data(args, profile, work)
        results["data_seconds"] = time.perf_counter() - started
        device = "cuda" if torch.cuda.is_available() else "cpu"
        photographs = Path(args.photographs) if args.photographs else None
        ctx = Context(profile, work, dataset, enhanced, photographs, out, device)
        if args.quality_steps:
            ctx.figures["quality_steps"] = args.quality_steps
        chosen = args.sections.split(",") if args.sections else [name for name, *_ in SECTIONS]
        for name, section, needs, compiles in SECTIONS:
            if name not in chosen:
                continue
            left = args.deadline - (time.perf_counter() - started)
            if section is section_quality and not args.quality_steps:
                needs += profile.train_budget_s
            if compiles and not profile.compile:
                results["sections"][name] = {"skipped": "torch.compile is off in this profile"}
            elif left < needs:
                results["sections"][name] = {"skipped": f"{left:.0f} s left of the deadline"}
            else:
                print(f"== {name} ({left:.0f} s left)", flush=True)
                section_started = time.perf_counter()
                try:
                    figures = section(ctx)
                except Exception as exc:  # one section's failure must not lose the others
                    figures = {"error": repr(exc), "traceback": traceback.format_exc()}
                    print(figures["traceback"], file=sys.stderr, flush=True)
                figures["section_seconds"] = time.perf_counter() - section_started
                results["sections"][name] = figures
            save()
    save()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json and .md")
    parser.add_argument("--idrid", help="IDRiD lesion segmentation set (its own folder layout)")
    parser.add_argument("--photographs", help="folder of photographs to write probabilities of")
    parser.add_argument("--tiny", action="store_true", help="CPU, synthetic data, seconds")
    parser.add_argument("--budget", type=float, help="quality run's training seconds")
    parser.add_argument(
        "--quality-steps", type=int, help="quality run's steps (default: budget x the stage's rate)"
    )
    parser.add_argument(
        "--sections", help=f"comma-separated subset of {', '.join(n for n, *_ in SECTIONS)}"
    )
    parser.add_argument(
        "--deadline", type=float, default=450.0, help="seconds after which sections are skipped"
    )
    args = parser.parse_args()
    if not args.tiny and not args.idrid:
        parser.error("--idrid is required (or --tiny for the CPU smoke run)")
    results = run_suite(args)
    print(markdown(results))
    failed = [name for name, figures in results["sections"].items() if "error" in figures]
    if failed:
        sys.exit(f"sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
