import json

import numpy as np
import pytest
import torch

from kvexport.exporter import export
from kvexport.runtime import ExportedModel, Generator, OrtDecoder, SamplingConfig
from kvexport.runtime.static_cache import StaticCacheDecoder
from kvexport.strategies import KvexportError
from kvexport.strategies.contract import positions_from_mask

PROMPTS = [[417, 1203, 33, 998, 4000, 12], [7, 8, 9]]


@pytest.fixture(scope="module", params=["tiny_neox", "tiny_llama"])
def static_export(request, tmp_path_factory):
    model_dir = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("static") / "export"
    return export(str(model_dir), "every:2", out, static=True, log=lambda _: None).directory


def test_static_graph_is_validated_at_export(static_export):
    manifest = json.loads((static_export / "kvexport.json").read_text())
    assert manifest["files"]["static_decode"] == "model_static.onnx"
    static_steps = [s for s in manifest["validation"]["steps"] if s["kind"] == "static decode"]
    assert len(static_steps) == 3 and max(s["relative"] for s in static_steps) < 1e-5


def test_static_decode_gives_the_dynamic_graphs_logits(static_export):
    model = ExportedModel.load(static_export)
    dynamic, static = OrtDecoder(model), StaticCacheDecoder(model, max_batch=4, max_length=32)
    ids = np.array([[0, 0, 0] + PROMPTS[1], PROMPTS[0]], dtype=np.int64)
    mask = (np.arange(6)[None] >= np.array([[3], [0]])).astype(np.int64)
    caches = dynamic.new_cache(2), static.new_cache(2)
    for _ in range(6):
        positions = positions_from_mask(mask)[:, -ids.shape[1]:]
        expected = dynamic.step(ids, mask, positions, caches[0])
        actual = static.step(ids, mask, positions, caches[1]).numpy()
        np.testing.assert_allclose(actual, expected, atol=2e-5, rtol=1e-4)
        ids = expected.argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)


def test_chunked_prefill_of_one_row_leaves_the_other_rows_alone(static_export):
    """Prefill runs one row at a time in chunks, through the same graph as decode: chunks of 2 tokens give the
    logits of a single chunk, and the other rows' cache slots are not touched."""
    model = ExportedModel.load(static_export)
    whole, chunked = (StaticCacheDecoder(model, max_batch=3, max_length=32, prefill_chunk=n) for n in (512, 2))
    chunked.storage.normal_()
    others = chunked.storage[:, [0, 2]].clone()
    expected = whole.prefill_row(1, torch.tensor(PROMPTS[0])).clone()
    np.testing.assert_allclose(chunked.prefill_row(1, torch.tensor(PROMPTS[0])), expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(chunked.storage[:, [0, 2]], others)
    length = len(PROMPTS[0])
    np.testing.assert_allclose(chunked.storage[:, 1, :, :length], whole.storage[:, 1, :, :length], atol=1e-5)


def test_batched_first_prompts_equal_prompts_prefilled_one_by_one(static_export):
    """First prompts of different lengths run as one right-padded batch in the staging rows and are copied into
    their rows (here not adjacent): the same logits and K/V as each prompt prefilled alone, other rows untouched,
    and decoding goes on from them alike."""
    model = ExportedModel.load(static_export)
    batched, alone = (StaticCacheDecoder(model, max_batch=4, max_length=32, prefill_batch=n) for n in (2, 1))
    batched.storage.normal_()
    untouched = batched.storage[:, [0, 2]].clone()
    rows, prompts = [3, 1], [torch.tensor(PROMPTS[0]), torch.tensor(PROMPTS[1])]
    logits = batched.prefill_rows(rows, prompts)[rows].clone()
    expected = torch.cat([alone.prefill_row(row, prompt).clone() for row, prompt in zip(rows, prompts)])
    np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(batched.storage[:, [0, 2]], untouched)
    for row, prompt in zip(rows, prompts):
        np.testing.assert_allclose(batched.storage[:, row, :, :len(prompt)], alone.storage[:, row, :, :len(prompt)],
                                   atol=1e-5)
    tokens, lengths = torch.tensor([5, 6, 7, 8]), torch.tensor([0, len(PROMPTS[1]), 0, len(PROMPTS[0])])
    steps = [decoder.decode_rows(tokens, lengths)[rows] for decoder in (batched, alone)]
    np.testing.assert_allclose(*steps, atol=2e-5, rtol=1e-4)


def test_dynamic_graph_computes_only_the_logits_asked_for(static_export):
    model = ExportedModel.load(static_export)
    decoder = OrtDecoder(model)
    ids = np.array([PROMPTS[0]], dtype=np.int64)
    mask = np.ones_like(ids)
    every = decoder.forward(ids, mask, positions_from_mask(mask), decoder.new_cache(1), logits_to_keep=0)
    last = decoder.forward(ids, mask, positions_from_mask(mask), decoder.new_cache(1), logits_to_keep=1)
    assert every.shape[1] == len(PROMPTS[0]) and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], every[:, -1], atol=1e-5)


def test_static_graph_uses_fused_kernels(static_export):
    """The decode graph's kernel count is what makes batch 1 fast on the GPU (docs/results.md): one fused
    attention per layer that reads the cache once and writes the new K/V in place, each residual add fused into
    the following norm, and no cache-sized op besides the attention."""
    import onnx

    manifest = json.loads((static_export / "kvexport.json").read_text())
    layers, parallel = manifest["model"]["num_layers"], manifest["model"]["architecture"] == "gpt_neox"
    graph = onnx.load(static_export / "model_static.onnx", load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    fused = "SkipLayerNormalization" if parallel else "SkipSimplifiedLayerNormalization"
    assert ops.count(fused) == (1 if parallel else 2) * layers  # one per residual add
    assert ops.count("GroupQueryAttention") == layers
    assert not {"Softmax", "Transpose", "Identity"} & set(ops)
    # GPT-NeoX: one normalisation and two MatMuls per layer (fold_parallel_norms); the one Concat per layer joins
    # the attention's context and the MLP's activation, never a cache
    weighted = (4 if not parallel else 2) * layers + 1  # Llama: q|k|v, o, gate|up, down; plus the LM head
    assert sum(op == "MatMul" for op in ops) == weighted
    assert ops.count("LayerNormalization") == (1 if parallel else 0)
    assert ops.count("Concat") == (layers if parallel else 0)
    # no bias Add: the output projections' biases go into the fused norms, GPT-NeoX's input projection's ride in
    # its MatMul (fold_parallel_norms)
    assert not any(name.endswith(".bias") for node in graph.node if node.op_type == "Add" for name in node.input)
    for node in graph.node:
        assert node.op_type != "Concat" or not any(name.startswith("past_key_values") for name in node.input)
    # tiny_neox's head_dim 16 with 4 rotary dims is outside GroupQueryAttention's rotary kernel: RotaryEmbedding
    # rotates q per layer and k per owner; tiny_llama's rotary runs inside the attention op.
    rotary_outside = parallel
    assert ops.count("RotaryEmbedding") == (layers + len(manifest["cache"]["owners"]) if rotary_outside else 0)
    # the float32 logits; seqlens_k as int64 only for RotaryEmbedding's positions (the kept position is int32)
    assert ops.count("Cast") == (2 if rotary_outside else 1)
    assert "GatherND" not in ops  # GatherElements over int32 indices: fewer device operations per step
    for node in graph.node:  # every layer attends over its owner's buffer and writes into it
        if node.op_type == "GroupQueryAttention":
            layer, owner = int(node.output[1].split(".")[1]), int(node.input[3].split(".")[1])
            assert manifest["strategy"]["kv_source"][layer] == owner
    outputs = {node_output for node in graph.node for node_output in node.output}
    assert {o.name for o in graph.output} <= outputs


def test_buffers_are_allocated_once_and_updated_in_place(static_export):
    model = ExportedModel.load(static_export)
    decoder = StaticCacheDecoder(model, max_batch=2, max_length=32)
    addresses = (decoder.storage.data_ptr(), decoder.logits.data_ptr(), decoder.seqlens.data_ptr())
    cache = decoder.new_cache(2)
    views = {name: view.data_ptr() for name, view in cache.values.items()}
    generator = Generator(model, backend="ort-static", max_batch=2)
    generator.decoder = decoder
    before = decoder.storage.clone()
    result = generator.generate(PROMPTS, SamplingConfig(max_new_tokens=6))
    assert (decoder.storage.data_ptr(), decoder.logits.data_ptr(), decoder.seqlens.data_ptr()) == addresses
    second = decoder.new_cache(2)
    assert {name: view.data_ptr() for name, view in second.values.items()} == views
    assert len(decoder._bindings) == 1  # one persistent binding for batch 2, reused by every step
    written = (decoder.storage != before).any(dim=(0, 2, 4))  # [row, slot]: which slots were written
    for row, prompt in enumerate(PROMPTS):  # compact rows: prompt + 5 decode steps from slot 0, nothing else
        assert written[row, : len(prompt) + 5].all() and not written[row, len(prompt) + 5:].any()
    assert result.token_ids == Generator(model).generate(PROMPTS, SamplingConfig(max_new_tokens=6)).token_ids


def test_static_cache_limits_are_clear_errors(static_export, tiny_neox, tmp_path):
    model = ExportedModel.load(static_export)
    decoder = StaticCacheDecoder(model, max_batch=2, max_length=32)
    with pytest.raises(KvexportError, match="exceeds the decoder's max_batch 2"):
        decoder.new_cache(3)
    cache = decoder.new_cache(1)
    too_long = np.ones((1, 33), dtype=np.int64)
    with pytest.raises(KvexportError, match="holds 32 tokens"):
        decoder.step(too_long, too_long, positions_from_mask(too_long), cache)
    with pytest.raises(KvexportError, match="CUDA graphs need the cuda provider"):
        StaticCacheDecoder(model, cuda_graph=True)
    plain = export(str(tiny_neox), "none", tmp_path / "plain", static=False, log=lambda _: None).directory
    with pytest.raises(KvexportError, match="without --no-static"):
        StaticCacheDecoder(ExportedModel.load(plain))


def test_on_device_sampling_returns_a_tensor(static_export):
    decoder = StaticCacheDecoder(ExportedModel.load(static_export), max_batch=1, max_length=32)
    ids = np.array([PROMPTS[0]])
    logits = decoder.step(ids, np.ones_like(ids), positions_from_mask(np.ones_like(ids)), decoder.new_cache(1))
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 8192)


def test_compare_handles_device_side_logits(static_export):
    """The static decoder returns torch tensors; the comparison must take them beside numpy logits."""
    from kvexport.runtime.compare import compare_decoders

    model = ExportedModel.load(static_export)
    result = compare_decoders(OrtDecoder(model), StaticCacheDecoder(model, max_batch=2, max_length=32),
                              batch=2, prompt=5, decode_steps=4)
    assert result.max_abs < 1e-4 and result.greedy_agreement == 1.0


def test_static_graph_refuses_a_head_dim_its_attention_kernel_cannot_take(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvexport.exporter.cli import main

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=36, num_hidden_layers=1, num_attention_heads=3,
                                 intermediate_size=32)).save_pretrained(tmp_path / "odd")
    assert main(["--model", str(tmp_path / "odd"), "--share", "none", "--static", "--output", str(tmp_path / "o"),
                 "--max-new-tokens", "0"]) == 2
    assert "head dim that is a multiple of 8" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_float32_static_graph_on_cuda_is_refused_before_anything_runs(static_export):
    with pytest.raises(KvexportError, match="runs on CUDA in float16 only"):
        StaticCacheDecoder(ExportedModel.load(static_export), provider="cuda")
