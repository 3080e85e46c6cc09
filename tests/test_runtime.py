import os

import numpy as np
import pytest
import torch

from kvexport.exporter import ReferenceDecoder, load_model
from kvexport.runtime import ExportedModel, Generator, SamplingConfig, choose_tokens, ort_session
from kvexport.runtime.ort_session import (
    CUDA_KERNEL_DEFAULTS,
    CUDA_PROVIDER_OPTIONS,
    cuda_session_settings,
    default_environment,
)
from kvexport.strategies import KvexportError, Strategy
from kvexport.strategies.contract import positions_from_mask

IRREGULAR = Strategy((0, 0, 2, 0), method="explicit")


def reference_greedy(model_dir, strategy, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with the float64 PyTorch reference of the same strategy, cache fed back as in the runtime."""
    loaded = load_model(str(model_dir))
    reference = ReferenceDecoder(loaded.description, strategy, torch.float64)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    past, out = None, []
    for _ in range(new_tokens):
        result = reference.forward(ids, mask, positions_from_mask(mask)[:, -ids.shape[1]:], past)
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        past, ids = result.present, torch.tensor([[token]])
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return out


PROMPT = [417, 1203, 33, 998, 4000, 12]


@pytest.mark.parametrize("strategy", ["every:2", IRREGULAR], ids=["every2", "irregular"])
def test_runtime_greedy_equals_reference_greedy(tiny_neox, export_cache, strategy):
    generator = Generator(export_cache(tiny_neox, strategy))
    tokens = generator.generate([PROMPT], SamplingConfig(max_new_tokens=12)).token_ids[0]
    expected = reference_greedy(tiny_neox, generator.model.strategy, PROMPT, 12)
    assert tokens == expected


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_llama"])
def test_runtime_greedy_equals_hf_generate_without_sharing(request, export_cache, fixture):
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(fixture)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(PROMPT):].tolist()
    generator = Generator(export_cache(model_dir, "none"))
    assert generator.generate([PROMPT], SamplingConfig(max_new_tokens=12)).token_ids[0] == hf_tokens


def test_batch_of_different_lengths_equals_one_by_one(tiny_neox, export_cache):
    generator = Generator(export_cache(tiny_neox, "every:2"))
    prompts = [PROMPT, PROMPT[:2], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
    config = SamplingConfig(max_new_tokens=8)
    batched = generator.generate(prompts, config).token_ids
    assert batched == [generator.generate([p], config).token_ids[0] for p in prompts]


def test_stream_deltas_add_up_to_the_text(tiny_neox, export_cache):
    generator = Generator(export_cache(tiny_neox, "every:2"))
    config = SamplingConfig(max_new_tokens=10, temperature=0.8, seed=3)
    streamed = ["", ""]
    for event in generator.stream(["The list", "A"], config):
        streamed = [s + d for s, d in zip(streamed, event.text_deltas)]
    assert streamed == generator.generate(["The list", "A"], config).texts
    assert any(streamed)


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_neox, export_cache):
    generator = Generator(export_cache(tiny_neox, "none"))
    sample = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=7)
    first, second = (generator.generate([PROMPT], sample).token_ids for _ in range(2))
    assert first == second
    assert generator.generate([PROMPT], SamplingConfig(max_new_tokens=10, temperature=1.0, seed=8)).token_ids != first
    greedy = generator.generate([PROMPT], SamplingConfig(max_new_tokens=10)).token_ids
    top1 = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=1, seed=1)
    assert generator.generate([PROMPT], top1).token_ids == greedy


def test_choose_tokens_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32)).repeat(20000, axis=0)
    rng = torch.Generator().manual_seed(0)

    def counts(config):
        return np.bincount(choose_tokens(logits, config, rng).numpy(), minlength=4)

    np.testing.assert_allclose(counts(SamplingConfig(temperature=1.0)) / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    nucleus = counts(SamplingConfig(temperature=1.0, top_p=0.7))
    assert nucleus[2] == nucleus[3] == 0  # 0.5 + 0.3 reaches 0.7: the tail is cut
    np.testing.assert_allclose(nucleus[:2] / 20000, [0.625, 0.375], atol=0.015)
    top2 = counts(SamplingConfig(temperature=1.0, top_k=2))
    assert top2[2] == top2[3] == 0
    hot = counts(SamplingConfig(temperature=2.0)) / 20000  # flatter: p ** (1/2), renormalised
    expected = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(hot, expected / expected.sum(), atol=0.015)


def test_stop_token_ends_a_sequence(tiny_neox, export_cache):
    generator = Generator(export_cache(tiny_neox, "none"))
    free = generator.generate([PROMPT], SamplingConfig(max_new_tokens=8)).token_ids[0]
    stopped = generator.generate([PROMPT], SamplingConfig(max_new_tokens=8, stop_token_ids=[free[2]]))
    assert stopped.token_ids[0] == free[:3]
    assert stopped.stats.new_tokens == 3


def test_cache_holds_owner_buffers_only(tiny_neox, export_cache):
    generator = Generator(export_cache(tiny_neox, "every:2"))
    result = generator.generate([PROMPT, PROMPT], SamplingConfig(max_new_tokens=5))
    stats = result.stats
    assert stats.kv_bytes * 2 == stats.kv_bytes_full
    # batch 2 x (6 prompt + 4 decoded) tokens x 2 owners x K,V x 4 heads x 16 dims x 4 bytes
    assert stats.kv_bytes == 2 * 10 * 2 * 2 * 4 * 16 * 4
    cache = generator.decoder.new_cache(2)
    assert sorted(cache.values) == sorted(f"past_key_values.{i}.{k}" for i in (0, 2) for k in ("key", "value"))


def test_prompt_longer_than_the_model_allows(tiny_neox, export_cache):
    generator = Generator(export_cache(tiny_neox, "none"))
    with pytest.raises(KvexportError, match=r"exceeds the model's positions \(128\)"):
        generator.generate([list(range(1, 120))], SamplingConfig(max_new_tokens=20))


def test_cuda_provider_missing_is_a_clear_error(tiny_neox, export_cache):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(KvexportError, match=r"kvexport\[gpu\]"):
        Generator(export_cache(tiny_neox, "none"), provider="cuda")


def test_manifest_describes_the_export(tiny_neox, export_cache):
    model = ExportedModel.load(export_cache(tiny_neox, IRREGULAR))
    assert model.layout.owners == (0, 2)
    assert model.layout.bytes_per_token() * 2 == model.layout.full_bytes_per_token
    assert model.facts.max_positions == 128 and model.facts.eos_token_ids == [0]


def test_a_tiny_temperature_samples_the_top_token():
    """Found by the property tests: logits / 1e-209 overflowed to inf and the softmax to NaN."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    config = SamplingConfig(max_new_tokens=1, temperature=2e-209, seed=0)
    assert choose_tokens(logits, config, config.generator(torch.device("cpu"))).tolist() == [1, 0]


def test_kernel_defaults_apply_around_session_creation_only(monkeypatch):
    # the CUDA sessions' ONNX Runtime kernel choices: a user's own setting wins, what bench reports is what the
    # sessions get, and nothing leaks to other sessions (a baseline's keep ONNX Runtime's defaults)
    monkeypatch.setenv("ORT_ENABLE_XQA", "1")
    monkeypatch.delenv("ORT_CUDA_GEMM_AUTO_TUNE", raising=False)
    reported = cuda_session_settings()
    assert reported == {"ORT_ENABLE_XQA": "1", "ORT_CUDA_GEMM_AUTO_TUNE": "1", **CUDA_PROVIDER_OPTIONS}
    with default_environment(CUDA_KERNEL_DEFAULTS):
        assert {name: os.environ[name] for name in CUDA_KERNEL_DEFAULTS} == {n: reported[n] for n in CUDA_KERNEL_DEFAULTS}
    assert os.environ["ORT_ENABLE_XQA"] == "1" and "ORT_CUDA_GEMM_AUTO_TUNE" not in os.environ


@pytest.mark.parametrize("quantized_cache", [False, True])
def test_cuda_sessions_get_the_reported_settings(monkeypatch, quantized_cache):
    # what bench reports as kvexport's CUDA session settings is what a CUDA session is made with (this machine has
    # no GPU: the session is recorded instead of made); XQA, off for a float cache, is on for a quantized one
    made = {}

    def record(path, options, providers):
        made.update(providers[0][1], **{n: os.environ.get(n) for n in CUDA_KERNEL_DEFAULTS})

    monkeypatch.setattr(ort_session, "check_provider", lambda provider: None)
    monkeypatch.setattr(ort_session.ort, "InferenceSession", record)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: type("Stream", (), {"cuda_stream": 7})())
    monkeypatch.delenv("ORT_CUDA_GEMM_AUTO_TUNE", raising=False)
    monkeypatch.delenv("ORT_ENABLE_XQA", raising=False)
    ort_session.make_session("model.onnx", "cuda", device_id=1, quantized_cache=quantized_cache)
    assert made == {"device_id": "1", "user_compute_stream": "7", **cuda_session_settings(quantized_cache)}
    assert made["ORT_ENABLE_XQA"] == ("1" if quantized_cache else "0")
