"""The kvexport command line. `kvexport --model M --share S` is the same as `kvexport export --model M --share S`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from kvexport.models import DEFAULT_MODEL
from kvexport.strategies import SPEC_HELP, KvexportError, make_strategy
from kvexport.strategies import contract as c

if TYPE_CHECKING:  # the runtime is imported by the commands that use it, not at start-up
    from kvexport.runtime import ExportedModel

DEFAULT_PROMPT = "In Python, a list"
API_KEY_VARIABLE = "KVEXPORT_API_KEY"  # the server's API key, when --api-key is not given (as vLLM's VLLM_API_KEY)


def strategy_label(spec: str) -> str:
    """How a strategy given on the command line is named in tables: a file's stem, or the spec itself."""
    return Path(spec).stem if spec.endswith(".json") else spec


def default_output(model: str, share: str) -> Path:
    return Path("exports") / f"{Path(model.rstrip('/')).name}.{strategy_label(share).replace(':', '')}"


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    add_provider_arg(parser)


def add_provider_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where ONNX Runtime runs (default auto: cuda when onnxruntime-gpu sees a GPU, else cpu)")


def add_quantization_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=["float", "int4", "int8"], default="float",
                        help="how the layers' projections are stored: in --dtype (default), or as 4- or 8-bit integers "
                             "with a scale per block of inputs (ONNX Runtime's MatMulNBits)")
    parser.add_argument("--weight-block", type=int, default=32, metavar="N", help="inputs per scale (default 32)")
    parser.add_argument("--kv-cache", choices=list(c.KV_CACHE_ELEMENTS),
                        help="hold the cache as int8 codes with a scale per KV head and channel, or float8 (E4M3) "
                             "codes with one scale a layer, set on calibration text (default: the cache in --dtype); "
                             "a float8 cache's static graph runs on CUDA only")


def weight_format(args: argparse.Namespace):
    from .models import BlockQuantized

    return None if args.weights == "float" else BlockQuantized(int(args.weights[3:]), args.weight_block)


def add_device_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], help=f"where {what} (default: cuda when there is one)")


def resolved_provider(args: argparse.Namespace, model: ExportedModel, static: bool) -> str:
    """--provider for an ExportedModel, run through its static graph or not."""
    from kvexport.runtime.ort_session import resolve_provider

    return resolve_provider(args.provider, model.dtype, static)


def cmd_export(args: argparse.Namespace) -> int:
    from .pipeline import export

    output = Path(args.output) if args.output else default_output(args.model, args.share)
    result = export(args.model, args.share, output, dtype=args.dtype, validate=not args.no_validate,
                    static=args.static, weight_format=weight_format(args), kv_cache=args.kv_cache,
                    provider=args.provider)
    cache = result.manifest["cache"]
    print(f"wrote {result.directory} in {result.seconds:.1f} s (peak host memory "
          f"{result.peak_host_bytes / 2**30:.2f} GiB): {len(cache['owners'])} of "
          f"{result.manifest['model']['num_layers']} layers cache K/V, {cache['bytes_per_token']} bytes/token "
          f"vs {cache['full_bytes_per_token']} full")
    if args.max_new_tokens > 0:
        from kvexport.runtime import ExportedModel
        from kvexport.runtime.memory import shortfall

        model = ExportedModel.load(result.directory)
        provider = resolved_provider(args, model, static=False)
        if not model.has_tokenizer:
            print(f"skipped the sample generation: {args.model} has no tokenizer files (the export is complete; "
                  "generate from token ids through the Python API, or add tokenizer files to the model directory)")
            return 0
        too_large = shortfall(model, provider)
        if too_large:
            print(f"skipped the sample generation on {provider}: {too_large} (the export is complete; generate "
                  "where it fits, e.g. on a GPU with --provider cuda)")
            return 0
        args.directory = result.directory
        return cmd_generate(args)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kvexport.runtime import ExportedModel, Generator, SamplingConfig

    # `generate` checks every file's hash by default; right after an export there is nothing to check.
    backend = getattr(args, "backend", "ort")
    model = ExportedModel.load(args.directory, verify_hashes=not getattr(args, "no_verify", True))
    generator = Generator(model, provider=resolved_provider(args, model, static=backend == "ort-static"),
                          backend=backend, max_batch=len(args.prompt or [DEFAULT_PROMPT]),
                          cuda_graph=getattr(args, "cuda_graph", False))
    prompts = args.prompt or [DEFAULT_PROMPT]
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_token_ids=generator.model.facts.eos_token_ids)
    if getattr(args, "stream", False) and len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        for event in generator.stream(prompts, config):
            print(event.text_deltas[0], end="", flush=True)
        print()
        stats = generator.last_stats
    else:
        result = generator.generate(prompts, config)
        for prompt, text in zip(prompts, result.texts):
            print(f"--- {prompt!r}\n{prompt}{text}")
        stats = result.stats
    print(stats.summary())
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(stats.to_dict(), indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from kvexport.runtime import ExportedModel

    model = ExportedModel.load(args.directory)
    facts, layout = model.facts, model.layout
    print(f"model      {facts.source} ({facts.architecture}, {facts.num_layers} layers, "
          f"{facts.num_heads} heads / {facts.num_kv_heads} KV heads, head dim {facts.head_dim})")
    print(f"dtype      {model.dtype}, projections {model.manifest.get('weights', {}).get('format', model.dtype)}, "
          f"cache {layout.dtype}")
    print(f"strategy   {model.strategy.method}: {len(layout.owners)} owners, {len(model.strategy.shared)} shared")
    print(model.strategy.describe())
    print(f"KV bytes per token  {layout.bytes_per_token()} vs {layout.full_bytes_per_token} full "
          f"({layout.bytes_per_token() / layout.full_bytes_per_token:.0%})")
    print(f"past inputs         {len(layout.names())}: {', '.join(p for p, _ in layout.names()[:4])}"
          + (" ..." if len(layout.names()) > 4 else ""))
    validation = model.manifest.get("validation")
    if validation:
        print(f"validation          max relative logit error {validation['worst']:.2e} "
              f"(tolerance {validation['tolerance']:.0e})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import time

    from kvexport.runtime import ExportedModel
    from kvexport.runtime.ort_session import open_graph

    started = time.perf_counter()
    model = ExportedModel.load(args.directory, verify_hashes=True)
    hashed_s = time.perf_counter() - started
    files = model.manifest["files"]
    graphs = [name for name in (files["onnx"], files.get("static_decode")) if name]
    for name in graphs:  # parses in ONNX Runtime, with the inputs and outputs of the strategy
        open_graph(model, name)
    records = model.manifest["integrity"]["files"]
    size_mib = sum(record["bytes"] for record in records.values()) / 2**20
    print(f"{args.directory}: ok: {len(records)} files ({size_mib:.1f} MiB) match their sizes and sha256 "
          f"({hashed_s:.2f} s); {' and '.join(graphs)} load with the inputs and outputs of the export's strategy "
          f"({len(model.strategy.owners)} of {model.strategy.num_layers} layers own a cache)")
    return 0


def cmd_strategy_make(args: argparse.Namespace) -> int:
    from .loading import load_config

    reference, config = load_config(args.model)
    strategy = make_strategy(args.spec, config.num_hidden_layers, reference)
    strategy.save(args.output)
    print(f"wrote {args.output}: {len(strategy.owners)} owners of {strategy.num_layers} layers")
    print(strategy.describe())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .calibration import read_text
    from .loading import load_model
    from .reference import compute_device
    from .search import SearchSettings, run_search, shared_count

    device = compute_device(args.device)
    loaded = load_model(args.model)
    count = shared_count(loaded.config.num_hidden_layers, args.shared_layers, args.ratio)
    settings = SearchSettings(shared_layers=count, criterion=args.criterion, threshold=args.threshold,
                              samples=args.samples, length=args.length, order=args.order)
    strategy = run_search(loaded, read_text(args.calib), settings, device=device)
    strategy.save(args.output)
    reached = "" if strategy.provenance["reached_target"] else f" (target {count} not reached at this threshold)"
    print(f"wrote {args.output}: {len(strategy.shared)} of {strategy.num_layers} layers shared{reached}")
    print(strategy.describe())
    return 0


def cmd_compress_heads(args: argparse.Namespace) -> int:
    from .compress_heads import run_compress_heads

    record = run_compress_heads(args.model, args.kv_heads, args.method, args.calib, args.samples, args.length,
                                args.output, args.fit_steps, args.share, args.device)
    errors = record["layers"]
    mean = {kind: sum(e[f"relative_{kind}_error"] for e in errors) / len(errors) for kind in ("key", "value")}
    bound = (f"; fitted for --share {args.share}: export it with --share {args.output / 'strategy.json'}"
             if "strategy" in record else "")
    print(f"wrote {args.output}: {args.kv_heads} of {record['original_kv_heads']} KV heads per layer "
          f"({args.method}); the head fit's mean relative K/V reconstruction error on the calibration text "
          f"(before any refit): keys {mean['key']:.3f}, values {mean['value']:.3f}{bound}")
    phases = Counter()  # not every layer runs every phase (an owner kept as it is has no fit steps)
    for layer in errors:
        phases.update(layer["seconds"])
    peak = f", peak device memory {record['peak_device_gib']} GiB" if "peak_device_gib" in record else ""
    print(f"{record['seconds']} s on {record['device']}{peak}; a layer, on average: "
          + ", ".join(f"{phase.replace('_', ' ')} {seconds / len(errors):.2f} s" for phase, seconds in phases.items()))
    return 0


def cmd_uptrain(args: argparse.Namespace) -> int:
    from kvexport.training import UptrainSettings, run_uptrain

    settings = UptrainSettings(
        steps=args.steps, batch_size=args.batch_size, length=args.length, accumulate=args.accumulate, lr=args.lr,
        warmup=args.warmup, eval_every=args.eval_every, eval_windows=args.eval_windows, patience=args.patience,
        seed=args.seed, lora_rank=args.lora, lora_alpha=args.lora_alpha,
        gradient_checkpointing=args.gradient_checkpointing)
    record = run_uptrain(args.kv_heads_model or args.model, args.share, args.data, args.output, settings,
                         eval_data=args.eval_data, resume=args.resume, device=args.device)
    if os.environ.get("RANK", "0") != "0":  # under torchrun the first process reports
        return 0
    before, best = record["before"], record["best"]
    print(f"wrote {args.output}: held-out perplexity {before['heldout_ppl']:.2f} -> {best['heldout_ppl']:.2f} "
          f"(accuracy {before['heldout_accuracy']:.3f} -> {best['heldout_accuracy']:.3f}) in "
          f"{record['steps_run']} steps, {record['seconds']:.0f} s on {record['device']}; export it with "
          f"--share {args.output / c.STRATEGY_FILE}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from kvexport.serving.app import serve
        from kvexport.serving.guard import Limits
        from kvexport.serving.openai_api import ApiSettings
    except ImportError as missing:
        raise KvexportError(f"serving needs the serve extra ({missing.name} is missing): pip install "
                            "'kvexport[serve]'") from None
    from kvexport.runtime import ExportedModel

    for option, value, least, what in (
            ("--stream-interval", args.stream_interval, 1, "a streamed event carries at least 1 token"),
            ("--api-servers", args.api_servers, 1, "a server needs at least 1 API server process"),
            ("--steps-in-flight", args.steps_in_flight, 1, "at least 1 step is queued ahead"),
            ("--prefill-chunk", args.prefill_chunk, 1, "an iteration prefills at least 1 prompt token"),
            ("--max-request-bytes", args.max_request_bytes, 1024, "a request body of at least 1024 bytes")):
        if value is not None and value < least:
            raise KvexportError(f"{option} {value}: {what}")
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    api = ApiSettings(model_name=args.model_name or "", stream_interval=args.stream_interval,
                      chat_template=read_chat_template(args.chat_template),
                      limits=Limits(api_key=api_key, max_request_bytes=args.max_request_bytes))
    options = {"provider": resolved_provider(args, ExportedModel.load(args.directory), static=True),
               "max_slots": args.max_slots,
               "max_queue": args.max_queue,
               "max_length": args.max_length, "cuda_graph": args.cuda_graph, "batching": args.batching,
               "steps_in_flight": args.steps_in_flight}
    if args.prefill_chunk is not None:  # else the Engine's default
        options["prefill_chunk"] = args.prefill_chunk
    if args.replicas:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise KvexportError("--replicas runs on Ray Serve, which is not installed: pip install 'kvexport[ray]'")
        from kvexport.serving.ray_app import serve_on_ray

        return serve_on_ray(args.directory, args.host, args.port, api, args.replicas, args.gpus_per_replica,
                            **options)
    return serve(args.directory, args.host, args.port, api, args.api_servers, **options)


def read_chat_template(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError as problem:
        raise KvexportError(f"--chat-template {path}: {problem.strerror}: give a Jinja template file") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from .calibration import read_text, token_windows
    from .evaluate import evaluate, load_baseline, table, write_report
    from .loading import load_model
    from .reference import compute_device

    device = compute_device(args.device)
    loaded = load_model(args.model)
    layers = loaded.config.num_hidden_layers
    strategies = {strategy_label(spec): make_strategy(spec, layers, loaded.reference) for spec in args.share}
    baseline = load_baseline(loaded, args.baseline)
    windows = token_windows(loaded.tokenizer(), read_text(args.text), args.windows, args.length, from_end=True)
    rows = evaluate(loaded, strategies, windows, with_torch=args.torch, baseline=baseline,
                    device=None if device.type == "cpu" else device, weight_format=weight_format(args),
                    kv_cache=args.kv_cache)
    print(table(rows))
    paths = write_report(rows, Path(args.output), {"model": loaded.reference, "windows": args.windows,
                                                    "length": args.length, "text": str(args.text or "default"),
                                                    "baseline": baseline.reference if baseline else None,
                                                    "computed_by": "onnxruntime (cpu)" if device.type == "cpu"
                                                    else f"float32 reference ({device.type})"})
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvexport.runtime.baselines import BASELINES, genai_installed, optimum_installed, require_genai, require_optimum
    from kvexport.runtime.bench import BenchSettings, run_bench, table, write_report
    from kvexport.runtime.ort_session import check_provider

    from .loading import load_model
    from .pipeline import export

    check_provider(args.provider)  # before any export
    backends = args.backends
    if backends is None:  # the peers a user would pick, where they are installed (hf-compile needs a GPU to matter)
        peers = {"optimum": optimum_installed(), "ort-genai": genai_installed(), "hf-compile": args.provider == "cuda"}
        backends = ["hf", *(peer for peer, present in peers.items() if present), "ort", "ort-static"]
        for peer in ("optimum", "ort-genai"):
            if not peers[peer]:
                print(f"{peer} is not installed: its baseline is left out", file=sys.stderr)
    for backend, require in (("optimum", require_optimum), ("ort-genai", require_genai)):
        if backend in backends:
            require()
    if "tensorrt" in backends and args.provider != "cuda":
        raise KvexportError("the tensorrt backend needs --provider cuda")
    if args.allocate and (args.provider != "cuda" or "ort-static" not in backends):
        raise KvexportError("--allocate measures device memory with the ort-static backend: add --provider cuda "
                            "and --backends ort-static")
    output = Path(args.output)
    loaded = load_model(args.model)
    exports, sharing = {}, {}
    quantized = weight_format(args)
    for spec in args.share:
        name = "-".join([strategy_label(spec).replace(":", ""), *([quantized.label] if quantized else []),
                         *([f"{args.kv_cache}kv"] if args.kv_cache else [])])  # also a directory name
        strategy = make_strategy(spec, loaded.config.num_hidden_layers, loaded.reference)
        sharing[name] = bool(strategy.shared)
        exports[name] = export(loaded, strategy, output / "exports" / name, dtype=args.dtype,
                               static="ort-static" in backends, log=lambda line: print(line, file=sys.stderr),
                               weight_format=quantized, kv_cache=args.kv_cache).directory
    if "tensorrt" in backends:
        from .tensorrt_build import BuildOptions, build_engine

        precision = {"float16": "fp16", "float32": "fp32"}[args.dtype]
        for directory in exports.values():
            build_engine(directory, BuildOptions(precision, max(args.batch), max(args.context)),
                         log=lambda line: print(line, file=sys.stderr))
    settings = BenchSettings(backends=tuple(backends), batches=tuple(args.batch), contexts=tuple(args.context),
                             provider=args.provider, steps=args.steps, warmup=args.warmup,
                             cuda_graph=args.cuda_graph, memory_budget_gib=args.memory_budget_gib,
                             optimum_level=args.optimum_level, allocate=args.allocate)
    runs = sum(1 for name in exports for backend in backends if backend not in BASELINES or not sharing[name])
    total = runs * len(args.batch) * len(args.context)
    with tqdm(total=total, desc="bench", unit="point") as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)
        report = run_bench(exports, loaded.directory, settings, progress)
    report["model"] = loaded.reference
    paths = write_report(report, output)
    print(table(report))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from .tensorrt_build import BuildOptions, build_engine

    options = BuildOptions(precision=args.precision, max_batch=args.max_batch, max_length=args.max_length,
                           profiles=tuple(p for p in args.profiles.split(",") if p),
                           workspace_gib=args.workspace_gib)
    build_engine(args.directory, options)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from kvexport.runtime import ExportedModel
    from kvexport.runtime.compare import compare_decoders
    from kvexport.runtime.generator import make_decoder

    model = ExportedModel.load(args.directory)
    first = make_decoder(model, "ort", args.provider)
    second = make_decoder(model, "tensorrt")
    result = compare_decoders(first, second, batch=args.batch, prompt=args.prompt_tokens, decode_steps=args.steps)
    print(result.summary((f"onnxruntime-{args.provider}", "tensorrt")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvexport", description="Share the KV cache across layers and export "
                                     "decoder LLMs to ONNX Runtime and TensorRT.")
    parser.add_argument("--version", action="version", version=f"kvexport {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser("export", help="export a model with a KV-sharing strategy (the default command)")
    export.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, alias or directory (default {DEFAULT_MODEL})")
    export.add_argument("--share", default="none", help=SPEC_HELP)
    export.add_argument("--output", help="export directory (default exports/MODEL.STRATEGY)")
    export.add_argument("--dtype", choices=["auto", "float32", "float16"], default="auto",
                        help="auto (default): float16 for a checkpoint stored in 16 bits when the export will run on a "
                             "GPU (--provider), else float32")
    export.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    export.add_argument("--static", action=argparse.BooleanOptionalAction, default=True,
                        help="also write the decode graph over preallocated cache buffers, which serve, bench's "
                             "ort-static and --backend ort-static run (default; --no-static writes the dynamic "
                             "graph only)")
    add_quantization_args(export)
    add_sampling_args(export)
    export.set_defaults(func=cmd_export)

    generate = sub.add_parser("generate", help="generate text with an export")
    generate.add_argument("directory", type=Path)
    add_sampling_args(generate)
    generate.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    generate.add_argument("--json", help="write the run's latency and memory report to this file")
    generate.add_argument("--backend", choices=["ort", "ort-static", "tensorrt"], default="ort")
    generate.add_argument("--no-verify", action="store_true",
                          help="skip the sha256 check of the export's files (sizes are still checked)")
    generate.add_argument("--cuda-graph", action="store_true", help="ort-static on CUDA: replay each step as a CUDA graph")
    generate.set_defaults(func=cmd_generate)

    inspect = sub.add_parser("inspect", help="print an export's strategy, owners and KV bytes per token")
    inspect.add_argument("directory", type=Path)
    inspect.set_defaults(func=cmd_inspect)

    verify = sub.add_parser("verify", help="check an export: every file's size and sha256, and its graphs")
    verify.add_argument("directory", type=Path)
    verify.set_defaults(func=cmd_verify)

    search = sub.add_parser("search", help="KVSharer search: find layers that can share a cache")
    search.add_argument("--model", default=DEFAULT_MODEL)
    search.add_argument("--calib", help="calibration text file (default: the default model's held-out text)")
    count = search.add_mutually_exclusive_group(required=True)
    count.add_argument("--shared-layers", type=int, help="number of layers to share")
    count.add_argument("--ratio", type=float, help="fraction of layers to share")
    search.add_argument("--criterion", choices=["cosine", "ppl"], default="cosine",
                        help="cosine: final hidden-state similarity (KVSharer); ppl: perplexity retention")
    search.add_argument("--threshold", type=float, help="accept a pair while the score exceeds this "
                        "(default 0.5 for cosine, 0.8 for ppl)")
    search.add_argument("--samples", type=int, default=30)
    search.add_argument("--length", type=int, default=64)
    search.add_argument("--order", choices=["dissimilar", "similar"], default="dissimilar",
                        help="walk the most dissimilar pairs first (KVSharer) or the most similar (for comparison)")
    add_device_arg(search, "the model runs for the calibration passes")
    search.add_argument("-o", "--output", type=Path, default=Path(c.STRATEGY_FILE))
    search.set_defaults(func=cmd_search)

    heads = sub.add_parser("compress-heads", help="fewer KV heads: turn multi-head into grouped-query attention")
    heads.add_argument("--model", default=DEFAULT_MODEL)
    heads.add_argument("--kv-heads", type=int, required=True,
                       help="KV heads per layer after compression (the model's own count keeps them, grouped-query "
                            "models too: with --share, only the shared layers are fitted)")
    heads.add_argument("--method", choices=["rope-svd-fit", "rope-svd-refit", "rope-svd", "rope-svd-plain", "mean"],
                       default="rope-svd-fit",
                       help="rope-svd: fitted to calibration K/V where their errors reach scores and outputs, "
                            "commuting with rotary; rope-svd-refit: then each layer's output projection refitted "
                            "to the original's attention output; rope-svd-fit: then each layer's Q, K, V and O "
                            "fitted to it by --fit-steps Adam steps; rope-svd-plain: the fit of the K/V "
                            "themselves; mean: GQA's mean-pooling")
    heads.add_argument("--fit-steps", type=int,
                       help="rope-svd-fit's Adam steps per layer (default 200; each a pass of one layer over the "
                            "calibration windows, forward and backward: the method's cost)")
    heads.add_argument("--share", default="none",
                       help="fit the layers for this sharing strategy (shared layers' queries and output projection "
                            "to read their owner's K/V); the output then exports with it only. With --kv-heads "
                            f"equal to the model's heads, only the shared layers are fitted. {SPEC_HELP}")
    add_device_arg(heads, "the model runs for the fits (rope-svd-fit's steps want a GPU beyond small models)")
    heads.add_argument("--calib", help="calibration text file (default: the default model's held-out text)")
    heads.add_argument("--samples", type=int, default=128,
                       help="calibration windows (default 128: 16,384 tokens at --length 128; 32 kept 2 to 10 points "
                            "less next-token accuracy on the tiny models)")
    heads.add_argument("--length", type=int, default=128, help="tokens per calibration window")
    heads.add_argument("-o", "--output", type=Path, required=True)
    heads.set_defaults(func=cmd_compress_heads)

    uptrain = sub.add_parser("uptrain", help="continue training a model with a sharing strategy in force")
    uptrain.add_argument("--model", default=DEFAULT_MODEL)
    uptrain.add_argument("--kv-heads-model", help="start from this compress-heads output instead of --model")
    uptrain.add_argument("--share", required=True, help=f"the strategy to train for: {SPEC_HELP}")
    uptrain.add_argument("--data", nargs="+", required=True, help="training text files, or folders of them")
    uptrain.add_argument("--eval-data", nargs="+", help="held-out text (default: the last 2%% of --data)")
    uptrain.add_argument("--steps", type=int, required=True)
    uptrain.add_argument("--batch-size", type=int, default=16)
    uptrain.add_argument("--length", type=int, default=256, help="tokens per training window")
    uptrain.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    uptrain.add_argument("--lr", type=float, default=3e-4)
    uptrain.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    uptrain.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default: steps/10)")
    uptrain.add_argument("--eval-windows", type=int, default=64, help="held-out windows per evaluation")
    uptrain.add_argument("--patience", type=int, default=0,
                         help="stop after this many evaluations without improvement (default: never)")
    uptrain.add_argument("--seed", type=int, default=0)
    uptrain.add_argument("--lora", type=int, default=0, metavar="R",
                         help="freeze the model and train rank-R adapters of its projections, merged into the output "
                              "(default 0: train every tensor, 16 bytes a parameter)")
    uptrain.add_argument("--lora-alpha", type=float, default=0.0, help="adapter scale alpha / R (default alpha 2R)")
    uptrain.add_argument("--gradient-checkpointing", action="store_true",
                         help="recompute each layer's activations in the backward pass instead of keeping them")
    add_device_arg(uptrain, "it trains (under torchrun: each process's GPU)")
    uptrain.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")
    uptrain.add_argument("-o", "--output", type=Path, required=True)
    uptrain.set_defaults(func=cmd_uptrain)

    server = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over an export (--static)")
    server.add_argument("directory", type=Path)
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--max-slots", type=int, default=16, help="sequences decoded together (cache rows)")
    server.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    server.add_argument("--max-length", type=int, help="tokens per sequence the cache holds (default: the model's)")
    add_provider_arg(server)
    server.add_argument("--cuda-graph", action="store_true")
    server.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                        help="static: admit a new batch only when the last one has finished (for comparison)")
    server.add_argument("--model-name", help="the model id clients send (default: the export's source)")
    server.add_argument("--stream-interval", type=int, default=1, metavar="N",
                        help="tokens per streamed event, at least (default 1: each as it comes; a larger N sends "
                             "clients fewer, larger events)")
    server.add_argument("--api-servers", type=int, default=1, metavar="N",
                        help="HTTP front-end processes on the port over the one engine (vLLM's "
                             "--api-server-count), for when one process's CPU cannot stream what the engine makes")
    server.add_argument("--steps-in-flight", type=int, metavar="N",
                        help="decode steps left queued on the device while the scheduler streams an earlier one's "
                             "tokens (default 2 on CUDA, so that a slow scheduler iteration does not idle the GPU; "
                             "1 on the CPU)")
    server.add_argument("--prefill-chunk", type=int, metavar="N",
                        help="prompt tokens prefilled per scheduler iteration, over all new prompts (default 256; "
                             "a batch of a sixteenth of the rows' first prompts may pass it): larger admits long "
                             "prompts sooner, smaller pauses the decoding requests less")
    server.add_argument("--api-key", help=f"clients must send 'Authorization: Bearer KEY' on /v1/ routes (default: "
                        f"${API_KEY_VARIABLE}; none: every request is served)")
    server.add_argument("--max-request-bytes", type=int, default=4 * 2**20, metavar="N",
                        help="larger request bodies get 413 before they are read (default 4 MiB)")
    server.add_argument("--chat-template", type=Path, metavar="FILE",
                        help="Jinja chat template for /v1/chat/completions (default: the tokenizer's own)")
    server.add_argument("--replicas", type=int, default=0,
                        help="serve on Ray Serve with this many replicas, one engine each (needs ray[serve])")
    server.add_argument("--gpus-per-replica", type=float, default=0.0)
    server.set_defaults(func=cmd_serve)

    evaluation = sub.add_parser("eval", help="perplexity and accuracy of strategies on held-out text")
    evaluation.add_argument("--model", default=DEFAULT_MODEL)
    evaluation.add_argument("--share", nargs="+", required=True, help="strategies to compare with the full model")
    evaluation.add_argument("--text", help="held-out text file (default: the default model's held-out text)")
    evaluation.add_argument("--windows", type=int, default=16)
    evaluation.add_argument("--length", type=int, default=256)
    evaluation.add_argument("--baseline", help="the model whose full accuracy the ratios are against (default: the "
                            "model a compress-heads or uptrain output was made from; else --model itself)")
    evaluation.add_argument("--torch", action="store_true", help="also evaluate the PyTorch reference")
    add_quantization_args(evaluation)
    add_device_arg(evaluation, "the models run (cpu: the exported ONNX graphs on ONNX Runtime; cuda: the float32 "
                               "reference on the GPU, the weights held once)")
    evaluation.add_argument("--output", default="eval-results")
    evaluation.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="decode latency and memory per backend, strategy, batch and context")
    bench.add_argument("--model", default=DEFAULT_MODEL)
    bench.add_argument("--share", nargs="+", default=["none", "every:2"], help="strategies to compare")
    bench.add_argument("--backends", nargs="+", choices=["hf", "hf-compile", "optimum", "ort-genai", "ort",
                                                        "ort-static", "tensorrt"],
                       help="default: hf, the peers that are installed (optimum, ort-genai; hf-compile on cuda), "
                       "ort, ort-static")
    bench.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    bench.add_argument("--context", type=int, nargs="+", default=[128, 512, 2048],
                       help="cache length at the end of each point's decode steps")
    bench.add_argument("--provider", choices=["cpu", "cuda"], default="cuda")
    bench.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    add_quantization_args(bench)
    bench.add_argument("--steps", type=int, default=16, help="timed decode steps per point")
    bench.add_argument("--warmup", type=int, default=4)
    bench.add_argument("--cuda-graph", action="store_true", help="ort-static: replay decode steps as CUDA graphs")
    bench.add_argument("--memory-budget-gib", type=float, default=16.0)
    bench.add_argument("--allocate", action="store_true",
                       help="allocate each strategy's computed max batch in the budget and measure its device memory")
    bench.add_argument("--optimum-level", choices=["O1", "O2", "O3", "O4"], default="O2",
                       help="ORTOptimizer level for the optimum baseline (float16 is converted at any level)")
    bench.add_argument("--output", default="bench-results")
    bench.set_defaults(func=cmd_bench)

    engine = sub.add_parser("build-engine", help="build a TensorRT engine from an export")
    engine.add_argument("directory", type=Path)
    engine.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    engine.add_argument("--max-batch", type=int, default=8)
    engine.add_argument("--max-length", type=int, default=512)
    engine.add_argument("--profiles", default="prefill,decode", help="comma-separated: prefill, decode")
    engine.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT workspace memory-pool limit")
    engine.set_defaults(func=cmd_build_engine)

    compare = sub.add_parser("compare", help="run the same inputs through ONNX Runtime and TensorRT")
    compare.add_argument("directory", type=Path)
    compare.add_argument("--provider", choices=["cpu", "cuda"], default="cuda")
    compare.add_argument("--batch", type=int, default=2)
    compare.add_argument("--prompt-tokens", type=int, default=8)
    compare.add_argument("--steps", type=int, default=8)
    compare.set_defaults(func=cmd_compare)

    strategy = sub.add_parser("strategy", help="make strategy files")
    strategy_sub = strategy.add_subparsers(dest="strategy_command", required=True)
    make = strategy_sub.add_parser("make", help="write a static strategy for a model")
    make.add_argument("spec", help="none or every:K")
    make.add_argument("--model", default=DEFAULT_MODEL)
    make.add_argument("-o", "--output", type=Path, default=Path(c.STRATEGY_FILE))
    make.set_defaults(func=cmd_strategy_make)
    return parser


def installed_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kvexport")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def require_onnxruntime() -> None:
    """ONNX Runtime is an extra (its CPU and GPU distributions exclude each other): say which to install."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise KvexportError("ONNX Runtime is not installed: pip install 'kvexport[cpu]', or 'kvexport[gpu]' on a "
                            "machine with an NVIDIA GPU")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "--version"):
        argv.insert(0, "export")  # the headline form: kvexport --model M --share S
    args = build_parser().parse_args(argv)
    try:
        require_onnxruntime()
        return args.func(args)
    except KvexportError as error:
        print(f"kvexport: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
