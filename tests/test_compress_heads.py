"""kvexport compress-heads: multi-head to grouped-query attention that transformers loads and kvexport exports."""

import json

import pytest
import torch

from kvexport.exporter import export, load_model
from kvexport.exporter.cli import main
from kvexport.strategies import KvexportError


@pytest.fixture(scope="module")
def tiny_mha_llama(tmp_path_factory):
    """4 layers, 4 query heads and 4 KV heads (multi-head attention), head dim 16, full rotary."""
    from conftest import _save_tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny-mha-llama", config, LlamaForCausalLM)


def logits(model_dir, ids):
    with torch.no_grad():
        return load_model(str(model_dir)).hf_model(input_ids=ids).logits


def compress(model_dir, out, kv_heads, method=None):
    chosen = [] if method is None else ["--method", method]  # None: the default, rope-svd-fit
    assert main(["compress-heads", "--model", str(model_dir), "--kv-heads", str(kv_heads), *chosen,
                 "--samples", "4", "--length", "64", "--fit-steps", "10", "-o", str(out)]) == 0
    return out


@pytest.fixture(params=["llama", "gpt_neox"])
def mha_model(request, tiny_mha_llama, tiny_neox):
    """Both ways a compressed model is stored: Llama with grouped-query attention, GPT-NeoX (partial rotary,
    biases) as the multi-head model it equals."""
    return {"llama": tiny_mha_llama, "gpt_neox": tiny_neox}[request.param]


IDS = torch.randint(0, 8192, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["rope-svd-fit", "rope-svd-refit", "rope-svd", "rope-svd-plain"])
def test_as_many_groups_as_heads_reproduces_the_model(mha_model, tmp_path, method):
    out = compress(mha_model, tmp_path / "g4", 4, method)
    torch.testing.assert_close(logits(out, IDS), logits(mha_model, IDS), rtol=1e-4, atol=1e-4)
    errors = json.loads((out / "kvexport_compression.json").read_text())["layers"]
    assert max(e["relative_key_error"] + e["relative_value_error"] for e in errors) < 1e-10


def test_compressed_checkpoint_loads_in_transformers_and_exports(mha_model, tmp_path):
    out = compress(mha_model, tmp_path / "g2", 2)
    loaded = load_model(str(out))
    assert loaded.config.num_key_value_heads == 2 and loaded.description.num_kv_heads == 2
    record = json.loads((out / "kvexport_compression.json").read_text())
    assert record["kv_heads"] == 2 and record["original_kv_heads"] == 4 and len(record["layers"]) == 4
    assert set(record["layers"][0]["seconds"]) == {"teacher", "head_fits", "student", "fit_steps"}
    # `none` validates the export against transformers itself; every:2 combines both methods.
    for strategy in ("none", "every:2"):
        result = export(str(out), strategy, tmp_path / f"e-{strategy.replace(':', '')}", log=lambda _: None)
        assert result.validation.passed and result.manifest["cache"]["num_kv_heads"] == 2
    cache = result.manifest["cache"]  # every:2 over 2 of 4 KV heads: a quarter of the original cache per token
    assert cache["bytes_per_token"] * 2 == cache["full_bytes_per_token"] == 4 * 2 * 2 * 16 * 4


def test_fitted_heads_beat_mean_pooling(mha_model, tmp_path):
    """Closer to the original model's logits, and the plain fit reconstructs the K/V themselves better."""
    original, distance, errors = logits(mha_model, IDS), {}, {}
    for method in ("rope-svd-fit", "rope-svd-refit", "rope-svd", "rope-svd-plain", "mean"):
        out = compress(mha_model, tmp_path / method, 2, method)
        distance[method] = float((logits(out, IDS) - original).pow(2).mean())
        layers = json.loads((out / "kvexport_compression.json").read_text())["layers"]
        errors[method] = sum(e["relative_key_error"] + e["relative_value_error"] for e in layers)
    assert max(distance[m] for m in ("rope-svd-fit", "rope-svd-refit", "rope-svd", "rope-svd-plain")) < distance["mean"]
    assert errors["rope-svd-plain"] < errors["mean"]


def first_attention_output(description, ids):
    """The first layer's attention output on ids: all models share its inputs."""
    from kvexport.exporter.reference import ReferenceDecoder
    from kvexport.strategies import no_sharing

    reference = ReferenceDecoder(description, no_sharing(description.num_layers), torch.float64)
    inputs = reference.prepare(ids, torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids))
    layer = description.layers[0]
    return reference.output(layer, reference.attention(0, layer, inputs.x, inputs, {}))


def test_each_refit_brings_the_first_layer_closer_to_the_original(mha_model):
    """On the calibration windows, the first layer's attention output (whose inputs all models share) is nearer the
    original's after the output refit than after the head fit alone, and nearer still after the attention fit; the
    output refit leaves the queries, keys and values as fitted."""
    from kvexport.exporter.compress_heads import compress_heads

    original = load_model(str(mha_model)).description
    windows = torch.randint(0, 8192, (4, 32), generator=torch.Generator().manual_seed(1))
    fitted, refitted, attention_fitted = (compress_heads(original, windows, 2, method, fit_steps=50)[0]
                                          for method in ("rope-svd", "rope-svd-refit", "rope-svd-fit"))
    target = first_attention_output(original, windows)
    errors = [float((first_attention_output(d, windows) - target).norm())
              for d in (fitted, refitted, attention_fitted)]
    assert errors[0] > errors[1] > errors[2]
    assert all(torch.equal(getattr(a, name).weight, getattr(b, name).weight) for a, b in
               zip(fitted.layers, refitted.layers) for name in ("q", "k", "v"))


def reference_logits(description, strategy_spec):
    from kvexport.exporter.reference import ReferenceDecoder
    from kvexport.strategies import make_strategy

    reference = ReferenceDecoder(description, make_strategy(strategy_spec, description.num_layers), torch.float64)
    ones = torch.ones_like(IDS)
    return reference.forward(IDS, ones, torch.arange(IDS.shape[1]).expand_as(IDS)).logits


def every2_distances(original, fitted) -> tuple[float, float]:
    """Mean squared distance of the logits under every:2 from the original's without sharing: training-free
    sharing's, the fitted model's."""
    target = reference_logits(original, "none")
    return tuple(float((reference_logits(d, "every:2") - target).pow(2).mean()) for d in (original, fitted))


def test_fitting_for_a_strategy_brings_the_shared_model_closer_and_binds_it(mha_model, tmp_path):
    """compress-heads --share every:2 with as many KV heads: under every:2 the fitted model's logits are nearer the
    original's (without sharing) than training-free sharing's; the first owner is kept; the output exports and
    validates with its strategy and is refused with another."""
    out = tmp_path / "fitted"
    assert main(["compress-heads", "--model", str(mha_model), "--kv-heads", "4", "--share", "every:2", "--samples",
                 "4", "--length", "64", "--fit-steps", "10", "-o", str(out)]) == 0
    original, fitted = (load_model(str(m)).description for m in (mha_model, out))
    shared, fitted_distance = every2_distances(original, fitted)
    assert fitted_distance < 0.9 * shared
    torch.testing.assert_close(first_attention_output(fitted, IDS), first_attention_output(original, IDS))
    assert json.loads((out / "kvexport_compression.json").read_text())["strategy"]["kv_source"] == [0, 0, 2, 2]
    assert export(str(out), str(out / "strategy.json"), tmp_path / "e", log=lambda _: None).validation.passed
    with pytest.raises(KvexportError, match="trained or fitted for the strategy"):
        export(str(out), "none", tmp_path / "other", log=lambda _: None)


def test_eval_without_the_source_model_says_so_in_one_line(tiny_mha_llama, tmp_path, capsys):
    out = compress(tiny_mha_llama, tmp_path / "g2", 2)
    record = json.loads((out / "kvexport_compression.json").read_text())
    (out / "kvexport_compression.json").write_text(json.dumps({**record, "source": str(tmp_path / "gone")}))
    assert main(["eval", "--model", str(out), "--share", "every:2", "--windows", "2", "--length", "64",
                 "--output", str(tmp_path / "eval")]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("no baseline")] != []
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["none", "every:2"]


def test_a_grouped_query_model_keeps_its_heads_and_is_fitted_for_sharing(tiny_llama, tmp_path, capsys):
    """Keeping a GQA model's own KV heads fits its shared layers; merging them further is refused in one line."""
    out = tmp_path / "fitted"
    assert main(["compress-heads", "--model", str(tiny_llama), "--kv-heads", "2", "--share", "every:2", "--samples",
                 "4", "--length", "64", "--fit-steps", "10", "-o", str(out)]) == 0
    original, fitted = (load_model(str(m)).description for m in (tiny_llama, out))
    assert fitted.num_kv_heads == 2 and torch.equal(fitted.layers[0].k.weight, original.layers[0].k.weight)
    shared, fitted_distance = every2_distances(original, fitted)
    assert fitted_distance < 0.9 * shared
    capsys.readouterr()  # the fit's progress bar
    assert main(["compress-heads", "--model", str(tiny_llama), "--kv-heads", "1", "-o", str(tmp_path / "g1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kv-heads 2, its own, keeps them" in err and not (tmp_path / "g1").exists()


def test_share_with_a_method_that_does_not_fit_is_one_line_and_nothing_is_written(tiny_mha_llama, tmp_path, capsys):
    assert main(["compress-heads", "--model", str(tiny_mha_llama), "--kv-heads", "2", "--method", "mean",
                 "--share", "every:2", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--method rope-svd-fit" in err and not list(tmp_path.iterdir())


def test_edited_repeated_heads_are_refused(tiny_neox, tmp_path, capsys):
    """A compressed GPT-NeoX changed as a multi-head model (its repeated K/V copies no longer equal) is not
    silently averaged."""
    from safetensors.torch import load_file, save_file

    out = compress(tiny_neox, tmp_path / "g2", 2)
    capsys.readouterr()  # compress-heads' own output
    tensors = load_file(out / "model.safetensors")
    tensors["gpt_neox.layers.1.attention.query_key_value.weight"][16:32] += 0.5  # head 0's keys
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    assert main(["--model", str(out), "--share", "none", "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer 1" in err and "differ" in err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("kv_heads", ["0", "3", "8"])
def test_bad_kv_heads_is_one_line_and_nothing_is_written(tiny_mha_llama, tmp_path, capsys, kv_heads):
    assert main(["compress-heads", "--model", str(tiny_mha_llama), "--kv-heads", kv_heads, "-o",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use one of 1, 2, 4" in err and not list(tmp_path.iterdir())


def test_negative_fit_steps_is_one_line_and_nothing_is_written(tiny_mha_llama, tmp_path, capsys):
    assert main(["compress-heads", "--model", str(tiny_mha_llama), "--kv-heads", "2", "--fit-steps", "-1", "-o",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fit-steps must be 0 or more" in err and not list(tmp_path.iterdir())


def test_search_and_eval_work_on_a_compressed_model(tiny_mha_llama, tmp_path, capsys):
    out = compress(tiny_mha_llama, tmp_path / "g2", 2)
    strategy = tmp_path / "s.json"
    assert main(["search", "--model", str(out), "--shared-layers", "1", "--samples", "4", "--length", "32",
                 "-o", str(strategy)]) == 0
    assert main(["eval", "--model", str(out), "--share", str(strategy), "--windows", "2", "--length", "64",
                 "--output", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["rows"]
    # the model it was compressed from (4 KV heads) first, the ratios against it; then 2 KV heads; 3 of 4 layers cache
    assert [r["kv_bytes_per_token"] for r in rows] == [2048, 1024, 768]
    assert rows[0]["name"] == "tiny-mha-llama: none" and rows[0]["perplexity_ratio"] == 1.0
    assert rows[1]["perplexity_ratio"] == pytest.approx(rows[1]["perplexity"] / rows[0]["perplexity"])
    assert main(["inspect", str(export(str(out), str(strategy), tmp_path / "e", log=lambda _: None).directory)]) == 0
    assert "4 heads / 2 KV heads" in capsys.readouterr().out


def test_sharing_fewer_heads_quantized_weights_and_an_int8_cache_compose(mha_model, tmp_path):
    """every:2 fitted with half the KV heads, exported with int4 projections and an int8 cache: validated, and the
    serving engine gives the static graph's tokens; with a float8 cache, its dynamic graph validated (the CPU runs
    no float8 static graph)."""
    from kvexport.exporter.models import BlockQuantized
    from kvexport.runtime import Generator, SamplingConfig
    from kvexport.runtime.engine import Engine

    heads = tmp_path / "heads"
    assert main(["compress-heads", "--model", str(mha_model), "--kv-heads", "2", "--share", "every:2", "--samples",
                 "4", "--length", "64", "--fit-steps", "10", "-o", str(heads)]) == 0
    result = export(str(heads), str(heads / "strategy.json"), tmp_path / "all", weight_format=BlockQuantized(4, 32),
                    kv_cache="int8", log=lambda _: None)
    manifest = result.manifest
    assert manifest["validation"]["passed"] and manifest["weights"]["format"] == "int4"
    assert manifest["cache"]["dtype"] == "int8" and manifest["cache"]["num_kv_heads"] == 2
    assert manifest["cache"]["owners"] == [0, 2]
    config = SamplingConfig(max_new_tokens=5, stop_token_ids=[])
    expected = Generator(result.directory, backend="ort-static", max_batch=1).generate(["In Python"], config)
    engine = Engine(result.directory, max_slots=1)
    assert [event.token_id for event in engine.submit("In Python", config)] == expected.token_ids[0]
    engine.close()
    float8 = export(str(heads), str(heads / "strategy.json"), tmp_path / "fp8", weight_format=BlockQuantized(4, 32),
                    kv_cache="fp8", static=False, log=lambda _: None).manifest
    assert float8["validation"]["passed"] and float8["cache"]["dtype"] == "float8_e4m3fn"


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_leading_singular_vectors_from_the_gram_matrix_span_the_svds(dtype):
    from kvexport.exporter.compress_heads import top_right_singular

    x = torch.randn(3, 500, 12, dtype=dtype, generator=torch.Generator().manual_seed(0))
    x = x * torch.linspace(0.1, 10, 12, dtype=torch.float64)  # distinct singular values
    ours, svd = top_right_singular(x, 4), torch.linalg.svd(x, full_matrices=False).Vh[:, :4].mH
    torch.testing.assert_close(ours @ ours.mH, svd @ svd.mH, rtol=0, atol=1e-10)  # the same projector


@pytest.mark.parametrize("share", ["none", "every:2"])
def test_only_the_cache_that_later_layers_read_is_held(tiny_mha_llama, monkeypatch, share):
    """At a 7B's width each layer's calibration K/V is 256 MiB in float64: holding every layer's would grow the
    device memory with the depth. A pass holds the K/V of at most the owner a layer reads and its own."""
    from kvexport.exporter.compress_heads import compress_heads
    from kvexport.exporter.reference import ReferenceDecoder
    from kvexport.strategies import make_strategy

    description = load_model(str(tiny_mha_llama)).description
    held, attention = [], ReferenceDecoder.attention

    def recording(self, i, layer, x, inputs, present, *args, **kwargs):
        held.append(len(present))
        return attention(self, i, layer, x, inputs, present, *args, **kwargs)

    monkeypatch.setattr(ReferenceDecoder, "attention", recording)
    strategy = make_strategy(share, description.num_layers, "tiny")
    compress_heads(description, IDS, 2, "rope-svd-fit", fit_steps=2, strategy=strategy)
    assert max(held) <= 2 and len(held) > description.num_layers
