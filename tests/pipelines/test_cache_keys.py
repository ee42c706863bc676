"""Which steps a retraining run takes from KFP's cache, read off the compiled pipeline.

No KFP backend runs here (kfp.local has no cache), so `cache_keys` computes the key of each
task of the pipeline's body (the exit handler's DAG) the way the KFP v2 driver does
(backend/src/v2/cacheutils/cache.go): the task's component, its input parameter values,
and the names of its input artifacts. An artifact keeps its name only when its producer
was itself taken from the cache; an uncached producer makes a new artifact, so a new name,
every run. Uncached tasks' outputs are what they
compute: here only the fingerprint's listing hash matters, given per source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from drseg.config import PretrainSettings
from drseg.pipeline import compile_pipeline

JOB_ID = "{{$.pipeline_job_uuid}}"


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_keys(
    spec: dict[str, Any], run: str, arguments: dict[str, str], listings: dict[str, str]
) -> dict[str, str | None]:
    """Display name -> cache key of each task of the body (None where not cached).

    `listings` maps a source to its content (what the fingerprint step reads).
    """
    root = spec["root"]
    params = {k: v.get("defaultValue") for k, v in root["inputDefinitions"]["parameters"].items()}
    params |= arguments
    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    tasks = {k: v for k, v in body.items() if "componentRef" in v}
    keys: dict[str, str | None] = {}
    outputs: dict[str, dict[str, str]] = {}
    artifacts: dict[str, str] = {}
    while len(keys) < len(tasks):
        for name, task in tasks.items():
            inputs = task.get("inputs", {})
            producers = {
                ref["producerTask"]
                for group in ("parameters", "artifacts")
                for source in inputs.get(group, {}).values()
                for ref in [source.get("taskOutputParameter") or source.get("taskOutputArtifact")]
                if ref
            }
            if name in keys or not producers <= set(keys):
                continue
            values = {}
            for param, source in inputs.get("parameters", {}).items():
                if "componentInputParameter" in source:
                    # The body sees the pipeline's parameters as "pipelinechannel--<name>".
                    name_in_root = source["componentInputParameter"].removeprefix(
                        "pipelinechannel--"
                    )
                    values[param] = params[name_in_root]
                elif "taskOutputParameter" in source:
                    ref = source["taskOutputParameter"]
                    values[param] = outputs[ref["producerTask"]][ref["outputParameterKey"]]
                else:
                    constant = source["runtimeValue"]["constant"]
                    values[param] = run if constant == JOB_ID else constant
            names = {
                artifact: artifacts[f"{ref['producerTask']}.{ref['outputArtifactKey']}"]
                for artifact, source in inputs.get("artifacts", {}).items()
                for ref in [source["taskOutputArtifact"]]
            }
            cached = task.get("cachingOptions", {}).get("enableCache", False)
            key = _hash([task["componentRef"]["name"], values, names])
            keys[name] = key if cached else None
            identity = key if cached else f"{run}/{name}"
            if task["componentRef"]["name"].startswith("comp-fingerprint"):
                outputs[name] = {"Output": listings[values["source"]]}
            else:
                outputs[name] = {"Output": _hash([identity, "Output"])}
            for artifact in (
                spec["components"][task["componentRef"]["name"]]
                .get("outputDefinitions", {})
                .get("artifacts", {})
            ):
                artifacts[f"{name}.{artifact}"] = _hash([identity, artifact])
    return {tasks[name]["taskInfo"]["name"]: key for name, key in keys.items()}


def _compiled(tmp_path: Path, pretrain_on_labelled: bool) -> dict[str, Any]:
    out = compile_pipeline(tmp_path / "t.yaml", pretrain_on_labelled=pretrain_on_labelled)
    spec: dict[str, Any] = next(yaml.safe_load_all(out.read_text()))
    return spec


ARGS = {"source": "s3://labelled", "pool_source": "s3://pool"}


@pytest.fixture(scope="module")
def default_spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _compiled(tmp_path_factory.mktemp("compiled"), PretrainSettings().include_labelled)


def test_new_labelled_data_reuses_the_encoder(default_spec: dict[str, Any]) -> None:
    """The retraining case: same pool, new labelled photographs."""
    first = cache_keys(default_spec, "run-1", ARGS, {"s3://labelled": "L1", "s3://pool": "P"})
    second = cache_keys(default_spec, "run-2", ARGS, {"s3://labelled": "L2", "s3://pool": "P"})
    assert first["pool-ingest"] == second["pool-ingest"]
    assert first["pool-clahe"] == second["pool-clahe"]
    assert first["pretrain"] == second["pretrain"]
    assert first["ingest"] != second["ingest"]
    assert first["clahe"] != second["clahe"]
    for step in ("fingerprint", "finetune", "evaluate", "gate"):
        assert first[step] is second[step] is None, f"{step} must never come from the cache"


def test_an_unchanged_source_is_not_ingested_again(default_spec: dict[str, Any]) -> None:
    listings = {"s3://labelled": "L1", "s3://pool": "P"}
    first = cache_keys(default_spec, "run-1", ARGS, listings)
    second = cache_keys(default_spec, "run-2", ARGS, listings)
    for step in ("ingest", "clahe", "pool-ingest", "pool-clahe", "pretrain"):
        assert first[step] is not None and first[step] == second[step], step


def test_a_new_pool_or_new_settings_pretrain_again(default_spec: dict[str, Any]) -> None:
    first = cache_keys(default_spec, "run-1", ARGS, {"s3://labelled": "L", "s3://pool": "P1"})
    new_pool = cache_keys(default_spec, "run-2", ARGS, {"s3://labelled": "L", "s3://pool": "P2"})
    assert first["pretrain"] != new_pool["pretrain"]
    settings = PretrainSettings(temperature=0.5).model_dump_json()
    retuned = cache_keys(
        default_spec,
        "run-3",
        {**ARGS, "pretrain_config": settings},
        {"s3://labelled": "L", "s3://pool": "P1"},
    )
    assert first["pool-clahe"] == retuned["pool-clahe"]
    assert first["pretrain"] != retuned["pretrain"]


def test_pretraining_on_labelled_data_keys_on_it(tmp_path: Path) -> None:
    """With pretrain.include_labelled the labelled split is a pretraining input, so new
    labelled photographs must re-run pretraining."""
    spec = _compiled(tmp_path, pretrain_on_labelled=True)
    first = cache_keys(spec, "run-1", ARGS, {"s3://labelled": "L1", "s3://pool": "P"})
    second = cache_keys(spec, "run-2", ARGS, {"s3://labelled": "L2", "s3://pool": "P"})
    assert first["pretrain"] != second["pretrain"]
    same = cache_keys(spec, "run-3", ARGS, {"s3://labelled": "L1", "s3://pool": "P"})
    assert first["pretrain"] == same["pretrain"]
