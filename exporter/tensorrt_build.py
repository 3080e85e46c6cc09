"""`kvexport build-engine`: a TensorRT engine from an export's ONNX, with prefill and decode profiles.

The engine is written next to the ONNX as model.engine, with model.engine.json recording what it was built
for. An existing engine is reused only when the ONNX hash, the TensorRT version, the GPU's compute
capability and the build options all match; otherwise it is rebuilt and the reason is printed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvexport.runtime import ExportedModel
from kvexport.runtime.tensorrt_support import import_tensorrt, logger, version
from kvexport.strategies import CacheLayout, KvexportError
from kvexport.strategies import contract as c
from kvexport.strategies.atomic import atomic_path, write_text_atomic

TIMING_CACHE_FILE = "timing.cache"
PROFILES = ("prefill", "decode")
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    max_batch: int = 8
    max_length: int = 512
    profiles: tuple[str, ...] = PROFILES
    workspace_gib: float = 4.0

    def check(self, model: ExportedModel) -> None:
        if model.layout.quantized or model.quantized_weights:
            raise KvexportError(f"{model.directory} holds quantized weights or a quantized cache, which the TensorRT "
                                "path does not build: export it without --weights and --kv-cache for build-engine")
        if self.precision not in PRECISION_DTYPES:
            raise KvexportError(f"precision must be one of {', '.join(PRECISION_DTYPES)}")
        if PRECISION_DTYPES[self.precision] != model.dtype:
            raise KvexportError(
                f"precision {self.precision} needs a {PRECISION_DTYPES[self.precision]} export, but {model.directory} "
                f"is {model.dtype}: the engine is built strongly typed from the ONNX types; re-export with "
                f"--dtype {PRECISION_DTYPES[self.precision]}" + (" (bf16 exports are not available yet)"
                                                                  if self.precision == "bf16" else "")
            )
        unknown = set(self.profiles) - set(PROFILES)
        if unknown or not self.profiles:
            raise KvexportError(f"profiles must be a comma-separated subset of {','.join(PROFILES)}")
        if self.max_batch < 1 or self.max_length < 2:
            raise KvexportError("need --max-batch >= 1 and --max-length >= 2")
        if self.max_length > model.facts.max_positions:
            raise KvexportError(f"--max-length {self.max_length} exceeds the model's {model.facts.max_positions} "
                                "positions")


def set_shape_values(profile, name: str, low: tuple, opt: tuple, high: tuple) -> None:
    """The values a shape-tensor input may take (logits_to_keep feeds a Slice). TensorRT 10 calls the method
    set_shape_input; later versions and TensorRT-RTX add a 64-bit variant."""
    for method in ("set_shape_input_v2", "set_shape_input", "set_shape_values"):
        if hasattr(profile, method):
            getattr(profile, method)(name, low, opt, high)
            return
    raise KvexportError("this TensorRT has no way to set a shape tensor's values in a profile: use TensorRT 10 or "
                        "later")


def profile_shapes(layout: CacheLayout, profile: str, max_batch: int, max_length: int) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) per input. Prefill: a prompt of 1..max_length tokens, empty past. Decode: one token
    over a past of 1..max_length-1 tokens."""
    opt_batch, half = max(1, max_batch // 2), max(1, max_length // 2)
    if profile == "prefill":
        tokens = ((1, 1), (opt_batch, half), (max_batch, max_length))
        mask = tokens
        past = tuple(layout.buffer_shape(b, 0) for b in (1, opt_batch, max_batch))
    elif profile == "decode":
        tokens = ((1, 1), (opt_batch, 1), (max_batch, 1))
        mask = ((1, 2), (opt_batch, half + 1), (max_batch, max_length))
        past = (layout.buffer_shape(1, 1), layout.buffer_shape(opt_batch, half), layout.buffer_shape(max_batch, max_length - 1))
    else:
        raise KvexportError(f"unknown profile '{profile}': use {' or '.join(PROFILES)}")
    shapes = {c.INPUT_IDS: tokens, c.POSITION_IDS: tokens, c.ATTENTION_MASK: mask}
    shapes.update({past_name: past for past_name, _ in layout.names()})
    return shapes


def onnx_digest(model: ExportedModel) -> str:
    digest = hashlib.sha256()
    for name in filter(None, (model.manifest["files"]["onnx"], model.manifest["files"].get("external_data"))):
        with open(model.directory / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def engine_key(model: ExportedModel, options: BuildOptions, trt_version: str, compute_capability: str) -> dict:
    return {"onnx_sha256": onnx_digest(model), "tensorrt_version": trt_version,
            "compute_capability": compute_capability, "options": {**asdict(options), "profiles": list(options.profiles)}}


def rebuild_reason(existing: dict | None, wanted: dict) -> str | None:
    """None when the existing engine can be reused; otherwise why not, in words."""
    if existing is None:
        return "no engine yet"
    if existing.get("onnx_sha256") != wanted["onnx_sha256"]:
        return "the ONNX model changed"
    for field, label in (("tensorrt_version", "TensorRT version"), ("compute_capability", "GPU compute capability")):
        if existing.get(field) != wanted[field]:
            return f"{label} {existing.get(field)} -> {wanted[field]}"
    old, new = existing.get("options", {}), wanted["options"]
    changed = [f"{k} {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k]]
    return "build options changed: " + ", ".join(changed) if changed else None


def compute_capability() -> str:
    import torch

    if not torch.cuda.is_available():
        raise KvexportError("building a TensorRT engine needs an NVIDIA GPU, and torch sees none here")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def parser_errors(parser) -> str:
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = f"node {error.node()}"
        if hasattr(error, "node_name") and error.node_name():
            where += f" '{error.node_name()}' ({error.node_operator()})"
        errors.append(f"{error.desc()} at {where}")
    return "; ".join(errors) or "no details"


def make_progress_monitor(trt, log):
    """Prints each build phase with elapsed time, where this TensorRT has IProgressMonitor."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    started = time.perf_counter()

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log(f"[{time.perf_counter() - started:6.1f} s] {phase_name}")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            pass

    return Monitor()


@dataclass
class BuildResult:
    engine: Path
    built: bool  # False when a matching engine was reused
    reason: str
    seconds: float
    engine_bytes: int
    tensorrt: str  # module and version


def build_engine(directory: str | Path, options: BuildOptions, log=print) -> BuildResult:
    model = ExportedModel.load(directory)
    options.check(model)
    trt = import_tensorrt()
    flavour = f"{trt.__name__} {version(trt)}"
    wanted = engine_key(model, options, version(trt), compute_capability())
    engine_path, info_path = model.directory / c.ENGINE_FILE, model.directory / c.ENGINE_INFO_FILE
    existing = json.loads(info_path.read_text()) if info_path.is_file() and engine_path.is_file() else None
    reason = rebuild_reason(existing, wanted)
    if reason is None:
        log(f"reusing {engine_path}: built for the same ONNX, {flavour}, GPU and options")
        return BuildResult(engine_path, False, "up to date", 0.0, engine_path.stat().st_size, flavour)
    log(f"building {engine_path} with {flavour} ({reason})")

    started = time.perf_counter()
    trt_logger = logger(trt)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(model.onnx_path)):
        raise KvexportError(f"TensorRT's ONNX parser rejected {model.onnx_path}: {parser_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    timing_path = model.directory / TIMING_CACHE_FILE
    timing_cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing_cache, ignore_mismatch=True)
    monitor = make_progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    profile_index = {}
    for name in options.profiles:
        profile = builder.create_optimization_profile()
        for tensor, (low, opt, high) in profile_shapes(model.layout, name, options.max_batch, options.max_length).items():
            profile.set_shape(tensor, low, opt, high)
        set_shape_values(profile, c.LOGITS_TO_KEEP, (0,), (1,), (1,))  # 0 (all positions) or 1 (the last)
        profile_index[name] = config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise KvexportError("TensorRT could not build the engine (see its messages above): try a smaller "
                            "--max-batch/--max-length or a larger workspace")
    seconds = time.perf_counter() - started
    with atomic_path(engine_path) as partial:
        partial.write_bytes(bytes(serialized))
    with atomic_path(timing_path) as partial:
        partial.write_bytes(bytes(config.get_timing_cache().serialize()))
    info = {**wanted, "tensorrt_module": trt.__name__, "profile_index": profile_index,
            "build_seconds": round(seconds, 2), "engine_bytes": engine_path.stat().st_size}
    write_text_atomic(info_path, json.dumps(info, indent=2) + "\n")
    log(f"built {engine_path} ({info['engine_bytes'] / 2**20:.1f} MiB) in {seconds:.1f} s")
    return BuildResult(engine_path, True, reason, seconds, info["engine_bytes"], flavour)
