"""Quantized projections (--weights int4|int8): the packing ONNX Runtime's MatMulNBits reads, exports validated
against the reference computing with the same quantized weights, generation on both graphs, and eval's rows."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kvexport.exporter import export, load_model
from kvexport.exporter.cli import main
from kvexport.exporter.models import BlockQuantized
from kvexport.exporter.quantize import dequantize, packed, quantize, round_trip
from kvexport.runtime import Generator, SamplingConfig
from kvexport.strategies import KvexportError


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_are_what_matmulnbits_computes_with(bits):
    """Codes within range, each weight within half a step of its block's scale, and one MatMulNBits node in ONNX
    Runtime multiplying by exactly the dequantized weight."""
    fmt = BlockQuantized(bits, 32)
    weight = torch.randn(96, 40) * 0.05  # [in, out]
    codes, scales = quantize(weight, fmt)
    assert codes.min() >= 0 and codes.max() < 2**bits and scales.shape == (40, 3)
    error = (dequantize(codes, scales, fmt) - weight).abs()
    assert (error <= scales.t().repeat_interleave(32, 0) / 2 + 1e-7).all()
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=96, N=40,
                            bits=bits, block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(packed(codes, fmt), "B"),
                               numpy_helper.from_array(scales.reshape(-1).numpy(), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 96)
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], (x @ round_trip(weight, fmt)).numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_neox"])
def test_quantized_export_validates_and_both_graphs_generate_alike(model, request, tmp_path, bits):
    """GPT-NeoX's parallel-residual norms stay apart from its quantized projections (they fold into float ones)."""
    source = str(request.getfixturevalue(model))
    result = export(source, "every:2", tmp_path / "q", weight_format=BlockQuantized(bits, 32), log=lambda _: None)
    validation = result.manifest["validation"]
    assert validation["passed"] and validation["worst"] <= 1e-5  # against the reference with the same weights
    assert 0 < validation["quantization_relative"] < (0.5 if bits == 4 else 0.05)
    assert result.manifest["weights"] == {"format": f"int{bits}", "bits": bits, "block": 32}
    plain = export(source, "every:2", tmp_path / "f", log=lambda _: None)
    assert result.manifest["weight_bytes"] < plain.manifest["weight_bytes"]
    assert (result.directory / "model.onnx.data").stat().st_size < (plain.directory / "model.onnx.data").stat().st_size
    config = SamplingConfig(max_new_tokens=6, stop_token_ids=[])
    prompts = ["In Python, a list", "def f(x):"]
    dynamic = Generator(result.directory).generate(prompts, config).token_ids
    static = Generator(result.directory, backend="ort-static", max_batch=2).generate(prompts, config).token_ids
    assert dynamic == static


def test_unsupported_quantization_is_one_line_and_writes_nothing(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_llama), "--share", "none", "--weights", "int4", "--weight-block", "24",
                 "--output", str(out)]) == 2
    assert "power of two" in capsys.readouterr().err and not out.exists()


def test_eval_reports_what_quantizing_costs(tiny_llama, tmp_path):
    """The model as it is first (the ratios' base), then every strategy with its projections quantized; the
    reference on a device gives the graphs' numbers."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} value {i}" for i in range(3000)))
    args = ["eval", "--model", str(tiny_llama), "--share", "every:2", "--weights", "int8", "--text", str(text),
            "--windows", "2", "--length", "32", "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "onnx")]) == 0
    rows = json.loads((tmp_path / "onnx" / "eval.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["tiny-llama-random: none", "none, int8", "every:2, int8"]
    assert rows[1]["perplexity"] != rows[0]["perplexity"] and rows[0]["perplexity_ratio"] == 1.0

    from kvexport.exporter.calibration import token_windows
    from kvexport.exporter.evaluate import evaluate
    from kvexport.exporter.loading import load_model
    from kvexport.strategies import make_strategy

    loaded = load_model(str(tiny_llama))
    windows = token_windows(loaded.tokenizer(), text.read_text(), 2, 32, from_end=True)
    on_device = evaluate(loaded, {"every:2": make_strategy("every:2", 4)}, windows, log=lambda _: None,
                         device=torch.device("cpu"), weight_format=BlockQuantized(8, 32))
    assert [r.perplexity for r in on_device] == pytest.approx([r["perplexity"] for r in rows], rel=1e-4)


@pytest.mark.parametrize("model, dtype", [("tiny_llama", "float16"), ("tiny_neox", "float32")])
def test_an_int8_cache_validates_and_every_runtime_path_runs_it(model, dtype, request, tmp_path):
    """--kv-cache int8: both graphs hold int8 codes (a quarter of float32's bytes), validated against the reference
    caching the same codes; the dynamic graph, the static graph and the serving engine give the same tokens. The
    scales stay float32 in a float16 export (GroupQueryAttention reads them so)."""
    from kvexport.runtime.engine import Engine

    result = export(str(request.getfixturevalue(model)), "every:2", tmp_path / "kv8", dtype=dtype, kv_cache="int8",
                    log=lambda _: None)
    validation, cache = result.manifest["validation"], result.manifest["cache"]
    assert validation["passed"] and 0 < validation["quantization_relative"] < 0.1
    assert cache["dtype"] == "int8"  # one byte an element, where float32's are four
    for graph in ("model.onnx", "model_static.onnx"):  # every layer reads its owner's scales: each held once
        names = [i.name for i in onnx.load(result.directory / graph, load_external_data=False).graph.initializer]
        assert len(names) == len(set(names)), graph
    assert cache["bytes_per_token"] == 2 * len(cache["owners"]) * cache["num_kv_heads"] * cache["head_dim"]
    config = SamplingConfig(max_new_tokens=6, stop_token_ids=[])
    prompts = ["In Python, a list", "def f(x):"]
    dynamic = Generator(result.directory).generate(prompts, config).token_ids
    static = Generator(result.directory, backend="ort-static", max_batch=2, prefill_batch=2)
    assert static.generate(prompts, config).token_ids == dynamic
    # prompts run one at a time after an empty past, never as first prompts (which CUDA attends over unquantized)
    assert static.decoder.prefill_batch == 1 and static.decoder.staging.shape[3] > static.decoder.prefill_chunk
    engine = Engine(result.directory, max_slots=2)
    handles = [engine.submit(prompt, config) for prompt in prompts]
    assert [[event.token_id for event in handle] for handle in handles] == dynamic
    engine.close()


def test_an_int8_cache_prompt_padded_as_on_cuda_writes_the_same_codes(tiny_llama, tmp_path):
    """An int8 cache's prompt runs after an empty past, padded as CUDA pads it (the padding counted in seqlens_k,
    after the prompt): the same logits and codes as the prompt alone, on the CPU, whose kernel takes both."""
    from kvexport.runtime import ExportedModel
    from kvexport.runtime.static_cache import StaticCacheDecoder

    model = ExportedModel.load(export(str(tiny_llama), "every:2", tmp_path / "kv8", dtype="float32",
                                      kv_cache="int8", log=lambda _: None).directory)
    alone, padded = (StaticCacheDecoder(model, max_batch=2, max_length=64) for _ in range(2))
    padded.prompt_width = lambda tokens: -(-tokens // 32) * 32
    prompt = torch.arange(3, 15)
    logits = [decoder.prefill_rows([1], [prompt])[1].clone() for decoder in (alone, padded)]
    np.testing.assert_allclose(*logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(alone.storage[:, 1, :, :12], padded.storage[:, 1, :, :12])


def test_a_float8_cache_rounds_as_float8_e4m3_does():
    """The reference's float8 round trip against ml_dtypes' cast (round to nearest even), values past 448 scales
    clipped there, as ONNX Runtime saturates."""
    import ml_dtypes

    from kvexport.exporter.cache_codes import QuantizedCache

    x = torch.randn(4, 2, 64, 8, dtype=torch.float64) * torch.logspace(-3, 3, 8, dtype=torch.float64)
    scale = torch.full((2, 1, 8), 0.5)
    scaled = np.clip(x.numpy() / 0.5, -448, 448)
    expected = scaled.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * 0.5
    np.testing.assert_array_equal(QuantizedCache("float8_e4m3fn", {}).round_trip(x, scale).numpy(), expected)


def test_a_float8_cache_validates_and_runs_on_the_cpu_in_the_dynamic_graph(tiny_llama, tmp_path):
    """--kv-cache fp8: the dynamic graph holds float8 E4M3 codes with one scale an owner, validated against the
    reference caching the same codes, and generates on the CPU; the static graph, which only CUDA runs, is refused
    without a GPU in one line, and an export made without validation still refuses to run it on the CPU."""
    from kvexport.runtime import ExportedModel
    from kvexport.runtime.static_cache import StaticCacheDecoder

    result = export(str(tiny_llama), "every:2", tmp_path / "fp8", kv_cache="fp8", static=False, log=lambda _: None)
    validation, cache = result.manifest["validation"], result.manifest["cache"]
    assert validation["passed"] and validation["worst"] < 1e-4 and 0 < validation["quantization_relative"] < 0.1
    assert cache["dtype"] == "float8_e4m3fn"
    graph = onnx.load(result.directory / "model.onnx", load_external_data=False).graph
    pasts = {i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past")}
    assert pasts == {TensorProto.FLOAT8E4M3FN}
    tokens = Generator(result.directory).generate(["def f(x):"], SamplingConfig(max_new_tokens=4)).token_ids
    assert len(tokens[0]) == 4
    with pytest.raises(KvexportError, match="runs on CUDA only"):
        export(str(tiny_llama), "every:2", tmp_path / "static", kv_cache="fp8", log=lambda _: None)
    assert not (tmp_path / "static").exists()
    unvalidated = export(str(tiny_llama), "every:2", tmp_path / "unvalidated", kv_cache="fp8", validate=False,
                         log=lambda _: None).directory
    with pytest.raises(KvexportError, match="--provider cuda"):
        StaticCacheDecoder(ExportedModel.load(unvalidated))
    # one scale an owner, the same initializer for K and V, as ONNX Runtime's XQA kernel takes a quantized cache
    static = onnx.load(unvalidated / "model_static.onnx", load_external_data=False).graph
    for node in (n for n in static.node if n.op_type == "GroupQueryAttention"):
        attributes = {a.name: a.s for a in node.attribute if a.name.endswith("quant_type")}
        assert attributes == {"k_quant_type": b"PER_TENSOR", "v_quant_type": b"PER_TENSOR"}
        assert node.input[12] == node.input[13] and node.input[12].endswith(".kv_scale")


def test_an_int8_cache_needs_calibration_text(tiny_llama, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    assert main(["--model", str(bare), "--share", "none", "--kv-cache", "int8", "--output", str(tmp_path / "o")]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_tensorrt_refuses_quantized_exports_in_one_line(tiny_llama, tmp_path, capsys):
    directory = export(str(tiny_llama), "none", tmp_path / "q", weight_format=BlockQuantized(4, 32),
                       log=lambda _: None).directory
    assert main(["build-engine", str(directory)]) == 2
    assert "quantized weights or a quantized cache" in capsys.readouterr().err


def test_a_float16_export_and_its_reference_dequantize_to_the_same_weights(tiny_llama, tmp_path):
    """MatMulNBits takes its scales in the graph's dtype: the codes are fitted to the scales as stored, and the
    validation's reference dequantizes with exactly those."""
    result = export(str(tiny_llama), "none", tmp_path / "h", dtype="float16", weight_format=BlockQuantized(4, 32),
                    log=lambda _: None)
    assert result.manifest["validation"]["passed"]
    stored = {i.name: numpy_helper.to_array(i, base_dir=str(result.directory))
              for i in onnx.load(result.directory / "model.onnx").graph.initializer}
    layer = load_model(str(tiny_llama)).description.layers[0]
    fmt = BlockQuantized(4, 32, scale_dtype="float16")
    # Q's columns too: the attention scale is not folded into their stored scales
    for name, weight in (("mlp.down_proj", layer.down.weight),
                         ("attn.qkv_proj", torch.cat([layer.q.weight, layer.k.weight, layer.v.weight], dim=1))):
        packed_codes, scales = (stored[f"layers.0.{name}.weight.{part}"] for part in ("q4", "scales"))
        codes = np.stack([packed_codes & 15, packed_codes >> 4], axis=-1).reshape(*packed_codes.shape[:2], -1)
        graph_weight = dequantize(torch.from_numpy(codes.astype(np.int16)),
                                  torch.from_numpy(scales.astype(np.float32)).view(codes.shape[0], -1), fmt)
        assert torch.equal(graph_weight, round_trip(weight, fmt)), name
        assert not torch.equal(graph_weight, round_trip(weight, BlockQuantized(4, 32)))  # float32 scales: 2^-11 off


def test_validation_runs_quantized_weights_on_the_cpu_where_cuda_is_there(monkeypatch):
    """CUDA's MatMulNBits sums a decode step's products in float16: the graphs are checked where they sum in float32."""
    from kvexport.exporter import validate

    monkeypatch.setattr(validate, "resolve_provider", lambda *args: "cuda")  # as on a machine with a GPU
    assert validate.validation_provider("float16", False, quantized_weights=False) == "cuda"
    assert validate.validation_provider("float16", False, quantized_weights=True) == "cpu"
    # a float8 cache's static graph has no CPU kernel, quantized weights or not
    assert validate.validation_provider("float16", True, quantized_weights=True, cache="float8_e4m3fn") == "cuda"
