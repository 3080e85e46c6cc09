"""Export a model under a strategy: build the graph, write the artifact directory, validate, publish.

Weights stream from the memory-mapped checkpoint into one external-data file shared by the graphs, tensor by
tensor, so an export holds about one layer of the model in memory besides what ONNX Runtime's validation
session needs. Everything is written into a hidden sibling directory first; only a complete, validated export is
renamed to the requested name, so a failure never leaves a half-written artifact behind. A sibling left by a
process that was killed is removed by the next export to the same name. The manifest records every file's size
and sha256 and the graphs' inputs and outputs, and is sealed with its own digest (strategies/integrity.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import torch

from kvexport.runtime.exported import has_tokenizer_files
from kvexport.runtime.ort_session import resolve_provider
from kvexport.strategies import KvexportError, ModelFacts, Strategy, make_strategy
from kvexport.strategies import contract as c
from kvexport.strategies.integrity import record_files, seal

from .cache_codes import QuantizedCache
from .loading import SIDE_FILES, LoadedModel, check_trained_strategy, load_config, load_model
from .models import BlockQuantized, DecoderDescription
from .onnx_graph import build_decoder, cache_layout
from .onnx_weights import WeightFile
from .validate import (
    HF_CHECK_BYTES,
    ValidationError,
    ValidationReport,
    quantization_error,
    reference_case,
    validate_export,
    validate_static,
    validation_provider,
)


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
    static: bool = True,
    log=print,
    weight_format: BlockQuantized | None = None,
    kv_cache: str | None = None,
    provider: str = "auto",
) -> ExportResult:
    """Export, validate and publish. dtype: float32, float16 or auto, which export_dtype resolves for `provider`,
    where the export is to run. static (the default) also writes the decode graph over preallocated cache buffers,
    which the server and the ort-static backend run; static=False writes the dynamic graph only.
    weight_format: the layers' projections stored quantized (MatMulNBits); validated against the reference computing
    with the same quantized weights, and the quantization's own effect on the logits reported beside.
    kv_cache="int8" or "fp8": the cache holds int8 codes with per-channel scales, or float8 E4M3 codes with one
    scale a layer, set on calibration text (quantize.kv_scales), which both graphs hold; validated likewise against
    the reference caching the same codes. A float8 cache's static graph runs, and so is validated, on CUDA only."""
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
    check_trained_strategy(loaded.directory, strategy)
    fmt = check_weight_format(loaded.description, weight_format)
    dtype = export_dtype(dtype, loaded.description, provider)
    description = replace(loaded.description, weight_format=None if fmt is None else replace(fmt, scale_dtype=dtype))
    element = c.KV_CACHE_ELEMENTS.get(kv_cache or "")
    if static and validate and element in c.CUDA_ONLY_STATIC_CACHES and validation_provider(
            dtype, True, False, element) != "cuda":  # before the calibration
        raise KvexportError("--kv-cache fp8: the static graph's float8 cache runs on CUDA only (ONNX Runtime's CPU "
                            "GroupQueryAttention has no float8 kernel), where it is validated: export on a GPU "
                            "with onnxruntime-gpu and --dtype float16, or with --no-static (the dynamic graph runs "
                            "on the CPU)")
    kv = None if kv_cache is None else cache_quantization(loaded, description, strategy, kv_cache)
    layout = cache_layout(description, strategy, dtype, kv)
    log(f"exporting {loaded.reference} ({description.architecture}, {description.num_layers} layers) with "
        f"{len(strategy.owners)} cache owners, {dtype}")

    remove_stale_partials(target)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        graphs = {}
        with WeightFile(staging / c.WEIGHTS_FILE) as weights:
            for name, is_static in ((c.MODEL_FILE, False), (c.STATIC_MODEL_FILE, True))[:2 if static else 1]:
                graph = build_decoder(description, strategy, dtype, weights, static=is_static, kv_quant=kv)
                (staging / name).write_bytes(graph.SerializeToString())  # references only: no weight bytes
                graphs[name] = graph_io(graph)
        weight_bytes = description.parameter_bytes(layout.bytes_per_element)
        for name in SIDE_FILES:
            if (loaded.directory / name).is_file():
                shutil.copy2(loaded.directory / name, staging / name)
        strategy.save(staging / c.STRATEGY_FILE)
        report = None
        if validate:
            validation_started = time.perf_counter()
            case = reference_case(description, strategy, kv_quant=kv)
            hf_check = (not strategy.shared and weight_format is None and kv is None
                        and description.parameter_bytes(4) <= HF_CHECK_BYTES)
            report = validate_export(staging / c.MODEL_FILE, case, description, strategy, dtype,
                                     hf_model=loaded.hf_model if hf_check else None, kv_quant=kv)
            if not strategy.shared and not hf_check:
                report.hf_skipped = ("quantized weights or cache" if weight_format or kv else
                                     f"float32 weights above {HF_CHECK_BYTES >> 30} GiB")
            if weight_format is not None or kv is not None:  # what quantizing changes, beside the graph's own error
                report.quantization_relative = quantization_error(case, loaded.description, strategy)
            if static:
                report.steps += validate_static(staging / c.STATIC_MODEL_FILE, case, description, strategy,
                                                dtype, kv_quant=kv).steps
            report.seconds = round(time.perf_counter() - validation_started, 2)
            log(report.summary())
            if not report.passed:
                raise ValidationError(
                    f"exported logits differ from the PyTorch reference beyond tolerance ({report.summary()}); "
                    "nothing was written: report this with the model and strategy, or export with --dtype float32"
                )
        manifest = {
            "format": c.FORMAT_NAME, "version": c.FORMAT_VERSION, "dtype": dtype, "weight_bytes": weight_bytes,
            "weights": ({"format": weight_format.label, "bits": weight_format.bits, "block": weight_format.block}
                        if weight_format else {"format": dtype}),
            "model": model_facts(loaded, description).to_dict(), "strategy": strategy.to_dict(),
            "cache": {"owners": list(layout.owners), "num_kv_heads": layout.num_kv_heads, "dtype": layout.dtype,
                      "head_dim": layout.head_dim, "bytes_per_token": layout.bytes_per_token(),
                      "full_bytes_per_token": layout.full_bytes_per_token},
            "files": {"onnx": c.MODEL_FILE, "external_data": c.WEIGHTS_FILE,
                      "static_decode": c.STATIC_MODEL_FILE if static else None},
            "validation": report.to_dict() if report else None,
            "integrity": {"files": {**record_files(staging, [f.name for f in staging.iterdir()
                                                             if f.is_file() and f.name != c.WEIGHTS_FILE]),
                                    c.WEIGHTS_FILE: weights.record()},
                          "graphs": graphs},
        }
        (staging / c.MANIFEST_FILE).write_text(json.dumps(seal(manifest), indent=2) + "\n")
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(target, manifest, report, time.perf_counter() - started, peak_host_bytes())


def cache_quantization(loaded: LoadedModel, description: DecoderDescription, strategy: Strategy,
                       kv_cache: str) -> QuantizedCache:
    """The cache that --kv-cache names, its scales from the model as exported run on the default calibration
    text."""
    if kv_cache not in c.KV_CACHE_ELEMENTS:
        raise KvexportError(f"--kv-cache {kv_cache}: the cache is the export's dtype, or one of "
                            f"{', '.join(c.KV_CACHE_ELEMENTS)}")
    if not has_tokenizer_files(loaded.directory):
        raise KvexportError(f"a {kv_cache} cache's scales are set on calibration text, and {loaded.reference} has "
                            "no tokenizer files: add them to the model directory")
    from .calibration import read_text, token_windows
    from .quantize import KV_CALIBRATION, kv_scales
    from .reference import compute_device

    windows = token_windows(loaded.tokenizer(), read_text(None), *KV_CALIBRATION)
    # A float8 cache keeps one scale an owner for K and V (its exponent spans the channels' magnitudes), which XQA
    # reads in place; int8 keeps one a KV head and channel (one code step over a channel's range).
    element = c.KV_CACHE_ELEMENTS[kv_cache]
    return kv_scales(description, strategy, windows, compute_device(None), element,
                     per_tensor=element == "float8_e4m3fn")


def export_dtype(dtype: str, description: DecoderDescription, provider: str = "auto") -> str:
    """--dtype auto: a checkpoint stored in 16 bits exports as float16 where it will run on a GPU (`provider`, as
    --provider resolves it), as serving engines keep a checkpoint's dtype; float32 otherwise (ONNX Runtime's CPU
    kernels compute in float32)."""
    if dtype != "auto":
        return dtype
    sixteen_bits = description.embed.dtype in (torch.float16, torch.bfloat16)
    on_gpu = resolve_provider(provider, "float16", static=True) == "cuda"
    return "float16" if sixteen_bits and on_gpu else "float32"


def check_weight_format(description: DecoderDescription, fmt: BlockQuantized | None) -> BlockQuantized | None:
    """The format, if this model's projections can be stored in it; else a one-line error."""
    if fmt is None:
        return None
    if fmt.bits not in (4, 8) or fmt.block < 16 or fmt.block & (fmt.block - 1):
        raise KvexportError(f"int{fmt.bits} weights in blocks of {fmt.block}: use int4 or int8 with a block "
                            "that is a power of two, at least 16")
    layer = description.layers[0]
    inputs = {lin.weight.shape[0] for lin in (layer.q, layer.o, layer.down)}
    if any(size % fmt.block for size in inputs):
        raise KvexportError(f"the projections' input sizes {sorted(inputs)} are not multiples of the block "
                            f"{fmt.block}: pass a --weight-block that divides them")
    return fmt


def publish(staging: Path, target: Path) -> None:
    """Swap the finished directory into place; an existing export of the same name is replaced."""
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)
