"""Model loading: bridge == Hugging Face, processing preserves logit differences, clear errors."""

from __future__ import annotations

import time

import pytest
import torch

from ioi.models import (
    ModelNotAvailableError,
    build_random_hf_model,
    load_model,
    model_slug,
    parse_random_spec,
    resolve_device,
)

LOGIT_ATOL = 1e-4  # fp32 tolerance for logits of two implementations of the same network
SHAPES = ("random-L2-H4-D16", "random-L3-H2-D8", "random-L1-H3-D12")
SENTENCES = [
    "When Mary and John went to the store, John gave a drink to",
    "Then, Anthony and Kelly had a long argument. Afterwards Kelly said to",
    "Friends Sarah and Paul found a ring at the garden. Paul gave it to",
]


def _padded_batch(tokenizer) -> tuple[torch.Tensor, list[int]]:
    ids = [tokenizer(s).input_ids for s in SENTENCES]
    width = max(map(len, ids))
    toks = torch.full((len(ids), width), tokenizer.eos_token_id, dtype=torch.long)
    for row, seq in enumerate(ids):
        toks[row, : len(seq)] = torch.tensor(seq)
    return toks, [len(seq) for seq in ids]


def test_tokenizer_is_real_gpt2(tokenizer):
    assert tokenizer(" Mary").input_ids == [5335]
    assert tokenizer(" John").input_ids == [1757]
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256


@pytest.mark.parametrize("spec", SHAPES)
def test_unprocessed_bridge_equals_hf_logits(spec, tokenizer):
    toks, _ = _padded_batch(tokenizer)
    hf = build_random_hf_model(spec, seed=3)
    bridge = load_model(spec, seed=3, device="cpu", fold_ln=False,
                        center_writing_weights=False, center_unembed=False)
    torch.testing.assert_close(bridge(toks), hf(toks).logits, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("spec", SHAPES)
def test_processing_preserves_logit_differences(spec, tokenizer):
    """fold_ln / centering shift each logit row by a constant: every logit difference is kept."""
    toks, _ = _padded_batch(tokenizer)
    hf_logits = build_random_hf_model(spec, seed=5)(toks).logits
    for fold_value_biases in (False, True):
        bridge = load_model(spec, seed=5, device="cpu", fold_value_biases=fold_value_biases)
        logits = bridge(toks)
        centred = logits - logits.mean(-1, keepdim=True)
        hf_centred = hf_logits - hf_logits.mean(-1, keepdim=True)
        torch.testing.assert_close(centred, hf_centred, atol=LOGIT_ATOL, rtol=0)
        # A specific IO-vs-S style difference at every position.
        a, b = 5335, 1757
        torch.testing.assert_close(
            logits[..., a] - logits[..., b], hf_logits[..., a] - hf_logits[..., b],
            atol=LOGIT_ATOL, rtol=0,
        )


def test_random_models_are_seeded(tokenizer):
    toks, _ = _padded_batch(tokenizer)
    first = load_model("random-tiny", seed=1, device="cpu")(toks)
    again = load_model("random-tiny", seed=1, device="cpu")(toks)
    other = load_model("random-tiny", seed=2, device="cpu")(toks)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_model_info_records_provenance():
    model = load_model("random-L1-H3-D12", seed=4, device="cpu", center_unembed=False)
    info = model.ioi_info
    assert (info.n_layers, info.n_heads, info.d_head, info.d_model) == (1, 3, 12, 36)
    assert info.seed == 4 and info.device == "cpu" and info.dtype == "float32"
    assert info.processing["center_unembed"] is False
    assert info.processing["fold_value_biases"] is False


def test_local_checkpoint_loads_offline(tmp_path, tokenizer):
    toks, _ = _padded_batch(tokenizer)
    hf = build_random_hf_model("random-L2-H4-D16", seed=7)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    bridge = load_model(tmp_path, device="cpu", fold_ln=False,
                        center_writing_weights=False, center_unembed=False)
    torch.testing.assert_close(bridge(toks), hf(toks).logits, atol=LOGIT_ATOL, rtol=0)
    assert bridge.ioi_info.source.startswith("local:")
    assert model_slug(tmp_path).startswith("local-")


def test_local_checkpoint_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        load_model(tmp_path, device="cpu")


def test_gpt2_small_offline_fails_fast_with_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("gpt2-small", device="cpu")
    assert time.perf_counter() - start < 15
    message = str(err.value)
    for needle in ("not on this machine", "model_path", "make demo", "network"):
        assert needle in message


@pytest.mark.parametrize(
    "spec, needle",
    [("gpt3-large", "Unknown model spec"), ("random-huge", "Unknown random model spec"),
     ("random-L0-H2-D8", ">= 1")],
)
def test_unknown_specs_are_clear_errors(spec, needle):
    with pytest.raises(ValueError, match=needle):
        load_model(spec, device="cpu")


def test_parse_random_spec():
    assert parse_random_spec("random-gpt2-small") == (12, 12, 64)
    assert parse_random_spec("random-L3-H4-D8") == (3, 4, 8)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
