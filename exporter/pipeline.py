"""Export a model under a strategy: build the graph, write the artifact directory, validate, publish.

Everything is written into a hidden sibling directory first; only a complete, validated export is
renamed to the requested name, so a failure never leaves a half-written artifact behind. A sibling left by a
process that was killed is removed by the next export to the same name. The manifest records every file's size
and sha256 and the graphs' inputs and outputs, and is sealed with its own digest (strategies/integrity.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from kvexport.strategies import KvexportError, ModelFacts, Strategy, make_strategy
from kvexport.strategies import contract as c
from kvexport.strategies.integrity import record_files, seal

from .loading import SIDE_FILES, LoadedModel, load_config, load_model
from .models import DecoderDescription, describe
from .onnx_graph import build_decoder, cache_layout
from .validate import ValidationError, ValidationReport, validate_export, validate_static

EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a model at 2 GiB; keep weights outside well before that


@dataclass
class ExportResult:
    directory: Path
    manifest: dict
    validation: ValidationReport | None
    seconds: float
    peak_host_bytes: int  # the process's peak resident memory so far (it includes what ran before the export)


def model_facts(loaded: LoadedModel, description: DecoderDescription) -> ModelFacts:
    config = loaded.config
    eos = config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return ModelFacts(
        architecture=description.architecture, source=loaded.reference, num_layers=description.num_layers,
        hidden_size=description.hidden_size, num_heads=description.num_heads,
        num_kv_heads=description.num_kv_heads, head_dim=description.head_dim,
        vocab_size=description.vocab_size, max_positions=description.max_positions,
        bos_token_id=config.bos_token_id, eos_token_ids=eos_ids,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else (eos_ids or [0])[0],
    )


def write_onnx(model: onnx.ModelProto, directory: Path, name: str, weight_bytes: int) -> bool:
    """Write NAME, with its weights in NAME.data when they are large. Returns that choice."""
    external = weight_bytes >= EXTERNAL_DATA_BYTES
    onnx.save_model(model, directory / name, save_as_external_data=external,
                    all_tensors_to_one_file=True, location=f"{name}.data", size_threshold=1024)
    return external


def peak_host_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def graph_io(model: onnx.ModelProto) -> dict[str, list[str]]:
    return {"inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}


def remove_stale_partials(target: Path) -> None:
    """Staging directories of earlier exports to the same name whose process is gone (killed mid-export)."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def export(
    model: str | LoadedModel,
    strategy: str | Strategy,
    output: str | os.PathLike[str],
    dtype: str = "float32",
    validate: bool = True,
    static: bool = False,
    log=print,
) -> ExportResult:
    """Export, validate and publish. static=True also writes the decode graph over preallocated cache buffers."""
    started = time.perf_counter()
    target = Path(output)
    if target.exists() and not (target / c.MANIFEST_FILE).is_file():
        raise KvexportError(f"{target} exists and is not a kvexport export: choose another --output")
    # Check the strategy against the config first: a bad strategy fails before the weights are read.
    reference, config = load_config(model) if isinstance(model, str) else (model.reference, model.config)
    if isinstance(strategy, str):
        strategy = make_strategy(strategy, config.num_hidden_layers, reference)
    else:
        strategy.check_model(config.num_hidden_layers, reference)
    loaded = load_model(model) if isinstance(model, str) else model
    description = describe(loaded.config, loaded.weights)
    layout = cache_layout(description, strategy, dtype)
    log(f"exporting {loaded.reference} ({description.architecture}, {description.num_layers} layers) with "
        f"{len(strategy.owners)} cache owners, {dtype}")

    remove_stale_partials(target)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        graph = build_decoder(description, strategy, dtype)
        weight_bytes = description.parameter_bytes(layout.bytes_per_element)
        external = write_onnx(graph, staging, c.MODEL_FILE, weight_bytes)
        graphs = {c.MODEL_FILE: graph_io(graph)}
        del graph
        if static:
            static_graph = build_decoder(description, strategy, dtype, static=True)
            write_onnx(static_graph, staging, c.STATIC_MODEL_FILE, weight_bytes)
            graphs[c.STATIC_MODEL_FILE] = graph_io(static_graph)
            del static_graph
        for name in SIDE_FILES:
            if (loaded.directory / name).is_file():
                shutil.copy2(loaded.directory / name, staging / name)
        strategy.save(staging / c.STRATEGY_FILE)
        report = None
        if validate:
            validation_started = time.perf_counter()
            report = validate_export(staging / c.MODEL_FILE, description, strategy, dtype,
                                     hf_model=loaded.hf_model if not strategy.shared else None)
            if static:
                static_report = validate_static(staging / c.STATIC_MODEL_FILE, description, strategy, dtype)
                report.steps += static_report.steps
            report.seconds = round(time.perf_counter() - validation_started, 2)
            log(report.summary())
            if not report.passed:
                raise ValidationError(
                    f"exported logits differ from the PyTorch reference beyond tolerance ({report.summary()}); "
                    "nothing was written: report this with the model and strategy, or export with --dtype float32"
                )
        manifest = {
            "format": c.FORMAT_NAME, "version": c.FORMAT_VERSION, "dtype": dtype, "weight_bytes": weight_bytes,
            "model": model_facts(loaded, description).to_dict(), "strategy": strategy.to_dict(),
            "cache": {"owners": list(layout.owners), "num_kv_heads": layout.num_kv_heads,
                      "head_dim": layout.head_dim, "bytes_per_token": layout.bytes_per_token(),
                      "full_bytes_per_token": layout.full_bytes_per_token},
            "files": {"onnx": c.MODEL_FILE, "external_data": c.WEIGHTS_FILE if external else None,
                      "static_decode": c.STATIC_MODEL_FILE if static else None},
            "validation": report.to_dict() if report else None,
            "integrity": {"files": record_files(staging, [f.name for f in staging.iterdir() if f.is_file()]),
                          "graphs": graphs},
        }
        (staging / c.MANIFEST_FILE).write_text(json.dumps(seal(manifest), indent=2) + "\n")
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(target, manifest, report, time.perf_counter() - started, peak_host_bytes())


def publish(staging: Path, target: Path) -> None:
    """Swap the finished directory into place; an existing export of the same name is replaced."""
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)
