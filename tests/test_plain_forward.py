"""ioi.plain_forward: the hook-free plain-tensor forward equals the hooked bridge forward.

The reference is ``engine="bridge"`` of :mod:`ioi.forward` (hooks on the TransformerLens
``TransformerBridge``), on random GPT-2 shapes (one with ``d_mlp != 4 * d_model`` and un-folded,
non-trivial LayerNorms), the planted model, BOS on and off, right-padded batches of unequal lengths.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import GPT2LMHeadModel

from ioi import plain_forward
from ioi.data import IOIDataset
from ioi.forward import cache_activations, end_logits, final_residual
from ioi.models import bridge_from_hf, build_hf_model, load_model, random_gpt2_config
from ioi.tokenizer import get_gpt2_tokenizer
from tests.ioi_batches import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4  # fp32
# The planted model is ill-conditioned in float32 (|q| ~ 400, sharp softmaxes): the bridge's own
# float32 forward is ~4e-4 off a float64 bridge forward in the last residual stream (~1.5e-4 in
# the END logits), so no float32 forward meets 1e-4 against it. There the plain forward must be as
# accurate as the bridge: |plain - bridge64| <= ACCURACY_RATIO * |bridge32 - bridge64| + 1e-5 for
# every tensor, and its END logit differences (IO - S) within 1e-4 of the bridge's.
ACCURACY_RATIO = 1.5


@functools.lru_cache(maxsize=None)
def narrow_mlp_model():
    """3 layers, 2 heads of 8, d_mlp = 24 (not 4 * d_model), init 0.2 (sharp attention), LayerNorms
    not folded and given random weights and biases."""
    config = random_gpt2_config(3, 2, 8)
    config.n_inner = 24
    config.initializer_range = 0.2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        hf = GPT2LMHeadModel(config).eval()
        for ln in [hf.transformer.ln_f] + [m for b in hf.transformer.h for m in (b.ln_1, b.ln_2)]:
            ln.weight.data = 1 + 0.5 * torch.randn(ln.weight.shape)
            ln.bias.data = 0.2 * torch.randn(ln.bias.shape)
    return bridge_from_hf(hf, get_gpt2_tokenizer(), device=torch.device("cpu"), fold_ln=False,
                          center_writing_weights=False, center_unembed=False)


@functools.lru_cache(maxsize=None)
def model_for(spec: str):
    if spec == "planted-float64":  # the bridge computing in float64: an independent reference
        hf, tokenizer, _ = build_hf_model("planted-ioi")
        return bridge_from_hf(hf.double(), tokenizer, device=torch.device("cpu"), dtype=torch.float64)
    return narrow_mlp_model() if spec == "narrow-mlp" else load_model(spec, device="cpu")


SPECS = ["random-L2-H4-D64", "narrow-mlp", "planted-ioi"]


def batch_for(spec: str, bos: bool):
    """(toks, END, IO ids, S ids) of a right-padded batch of unequal lengths."""
    if spec == "planted-ioi":
        data = IOIDataset(N=16, seed=2, prepend_bos=bos)  # padded after END too (the answer slot)
        return data.toks, data.word_idx["END"], data.io_token_ids, data.s_token_ids
    toks, _, word_idx, io, s, _ = make_batch(9, bos=bos, seed=3)  # three templates: 13 to 23 tokens
    return toks, word_idx["END"], io, s


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    diff = float((got - want).abs().max())
    assert diff <= ATOL, diff


def check_against_bridge(spec: str, got: torch.Tensor, reference) -> None:
    """``got`` (plain) against ``reference(model)`` (the bridge): 1e-4, or for the planted model as
    accurate as the bridge's float32 forward, both measured against its float64 forward."""
    want = reference(model_for(spec))
    if spec != "planted-ioi":
        return assert_close(got, want)
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    exact = reference(model_for("planted-float64")).double()
    plain_error = float((got.double() - exact).abs().max())
    bridge_error = float((want.double() - exact).abs().max())
    assert plain_error <= ACCURACY_RATIO * bridge_error + 1e-5, (plain_error, bridge_error)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_end_logits_plain_equal_bridge(spec, bos):
    model = model_for(spec)
    assert plain_forward.unavailable_reason(model) is None
    toks, end, io, s = batch_for(spec, bos)
    assert len(set(end.tolist())) > 1  # right-padded, unequal lengths
    memo = {}

    def bridge(m):  # each reference forward once
        if id(m) not in memo:
            memo[id(m)] = end_logits(m, toks, end, engine="bridge")
        return memo[id(m)]

    got = end_logits(model, toks, end, engine="plain", memory_budget_mb=None)
    check_against_bridge(spec, got, bridge)
    # chunked: one prompt per chunk; and chunks of mixed lengths (cut after their longest END)
    check_against_bridge(spec, end_logits(model, toks, end, engine="plain", memory_budget_mb=1e-6), bridge)
    net = plain_forward.weights(model)
    chunks = plain_forward.length_chunks(end, max_prompts=4, min_rows=1)
    assert sorted(torch.cat(chunks).tolist()) == list(range(len(end)))
    assert len(plain_forward.length_chunks(end, max_prompts=len(end), min_rows=10**9)) == 1
    mixed = plain_forward.end_logits(net, toks, end, max_prompts=3)  # 3 prompts, lengths differ
    check_against_bridge(spec, mixed, bridge)
    # the logit differences the metrics read, within 1e-4 for every model
    rows = torch.arange(len(end))
    want = bridge(model)
    diff = (got[rows, io] - got[rows, s]) - (want[rows, io] - want[rows, s])
    assert float(diff.abs().max()) <= ATOL
    # repeat runs are bit-identical; "auto" picks the plain forward
    assert torch.equal(got, end_logits(model, toks, end, engine="plain", memory_budget_mb=None))
    assert torch.equal(end_logits(model, toks, end, memory_budget_mb=None), got)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_cache_plain_equal_bridge(spec, bos):
    model = model_for(spec)
    toks = batch_for(spec, bos)[0]
    n_layers = model.cfg.n_layers
    names = [name for name in model.hook_dict if plain_forward.parse_hook(name, n_layers) is not None]
    assert len(names) == 6 + 12 * n_layers  # every served name exists on the bridge
    got = cache_activations(model, toks, names, engine="plain")
    assert set(got) == set(names)
    bridge = {}
    for name in names:
        def reference(m, name=name):
            key = (id(m), bos)
            if key not in bridge:
                bridge[key] = cache_activations(m, toks, names, engine="bridge")
            return bridge[key][name]
        check_against_bridge(spec, got[name], reference)
    # a cache that needs block 0 only stops there, and repeats bit-identically
    early = ["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_mid"]
    first = cache_activations(model, toks, early)
    again = cache_activations(model, toks, early)
    for name in early:
        assert torch.equal(first[name], got[name]) and torch.equal(first[name], again[name])
    check_against_bridge(spec, final_residual(model, toks), lambda m: final_residual(m, toks, engine="bridge"))


def test_dispatch_hooks_unsupported_and_unserved_go_to_the_bridge(monkeypatch):
    model = model_for("random-L2-H4-D64")
    toks, end, *_ = batch_for("random-L2-H4-D64", False)
    plain = end_logits(model, toks, end)

    def head_off(z, hook):
        z = z.clone()
        z[:, :, 1] = 0.0
        return z

    hooks = [("blocks.1.attn.hook_z", head_off)]
    hooked = model.run_with_hooks(toks, fwd_hooks=hooks)[torch.arange(len(end)), end].float().cpu()

    def refuse(*args, **kwargs):
        raise AssertionError("the plain forward must not run here")

    monkeypatch.setattr(plain_forward, "end_logits", refuse)
    monkeypatch.setattr(plain_forward, "cache", refuse)
    # hooks run on the bridge, and change the result
    got = end_logits(model, toks, end, fwd_hooks=hooks)
    assert_close(got, hooked)
    assert float((got - plain).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="forward hooks"):
        end_logits(model, toks, end, fwd_hooks=hooks, engine="plain")
    # hooks attached to the model (not passed): the bridge, where they run
    with model.hooks(fwd_hooks=hooks):
        assert_close(end_logits(model, toks, end), hooked)
        assert float(cache_activations(model, toks, ["blocks.1.attn.hook_z"])["blocks.1.attn.hook_z"][:, :, 1]
                     .abs().max()) == 0.0
    # a name the plain forward does not serve: the whole cache from the bridge
    mixed = cache_activations(model, toks, ["blocks.0.mlp.hook_post", "blocks.0.hook_resid_post"])
    assert mixed["blocks.0.mlp.hook_post"].shape[-1] == model.cfg.d_mlp
    with pytest.raises(ValueError, match="does not serve"):
        cache_activations(model, toks, ["blocks.0.mlp.hook_post"], engine="plain")
    with pytest.raises(ValueError, match="engine must be one of"):
        end_logits(model, toks, end, engine="fast")
    # IOI_FORWARD=bridge, and a model outside the plain forward (here: float64)
    monkeypatch.setenv(plain_forward.ENGINE_ENV, "bridge")
    assert_close(end_logits(model, toks, end), plain)
    monkeypatch.delenv(plain_forward.ENGINE_ENV)
    hf, tokenizer, _ = build_hf_model("random-L1-H2-D4")
    double = bridge_from_hf(hf.double(), tokenizer, device=torch.device("cpu"), dtype=torch.float64)
    assert "dtype" in plain_forward.unavailable_reason(double)
    assert end_logits(double, toks, end).shape == plain.shape  # on the bridge (plain refuses)
    monkeypatch.setattr(plain_forward, "unsupported_reason", lambda m: "an unsupported architecture")
    assert plain_forward.unavailable_reason(model) == "an unsupported architecture"
    assert_close(end_logits(model, toks, end), plain)
    rows = torch.arange(len(end), device=model.W_U.device)
    assert_close((final_residual(model, toks)[rows, end.to(rows.device)] @ model.W_U + model.b_U).cpu(), plain)


def test_bad_end_positions_are_named():
    model = model_for("random-L2-H4-D64")
    toks, end, *_ = batch_for("random-L2-H4-D64", False)
    with pytest.raises(ValueError, match="outside the"):
        end_logits(model, toks, end + toks.shape[1])


SIGNALS_CIRCUIT = {"name mover": ((2, 1), (1, 0)), "s-inhibition": ((1, 1), (0, 0), (0, 1))}


@pytest.mark.parametrize("bos", [False, True])
def test_signals_and_adversarial_plain_equal_the_hooked_bridge(monkeypatch, bos):
    """``signals`` (z patched at END, name-mover patterns read at END: plain_forward.EndRun against
    the hooks on the bridge) and ``adversarial`` (END logits), both engines, one sharp model."""
    from ioi.circuits import Circuit
    from ioi.experiments import signals as sg
    from ioi.experiments.core import RunContext
    from tests.ioi_batches import sharp_model

    model = sharp_model("random-L3-H4-D16")
    ioi = IOIDataset(N=10, seed=4, prepend_bos=bos)
    ctx = RunContext(datasets={"ioi": ioi}, circuit=Circuit("t", SIGNALS_CIRCUIT), seed=0, n=len(ioi),
                     progress=False)
    results = {}
    for engine in ("plain", "bridge"):
        if engine == "bridge":
            monkeypatch.setenv(plain_forward.ENGINE_ENV, "bridge")
        results[engine] = (sg.signals(model, ctx), sg.adversarial(model, ctx))
    monkeypatch.delenv(plain_forward.ENGINE_ENV)
    (sig, adv), (sig_ref, adv_ref) = results["plain"], results["bridge"]
    columns = ["logit_diff", "clean_logit_diff", "nm_end_to_io", "nm_end_to_s1", "nm_end_to_s2"]
    got, want = sig.data[columns].to_numpy(), sig_ref.data[columns].to_numpy()
    assert abs(got - want).max() <= ATOL
    assert abs(got[:, 0] - got[:, 1]).max() > 1e-2  # the patches matter
    assert abs(adv.data["logit_diff"].to_numpy() - adv_ref.data["logit_diff"].to_numpy()).max() <= ATOL
    assert abs(adv.data["io_prob"].to_numpy() - adv_ref.data["io_prob"].to_numpy()).max() <= ATOL


def _prompt_sets_sharing_prefixes(d_vocab: int, seed: int):
    """Three right-padded token sets of 9 prompts whose prompt i share its first prefix_len[i]
    tokens (1..5), with different continuations and END positions."""
    g = torch.Generator().manual_seed(seed)
    n = 9
    prefix_len = torch.randint(1, 6, (n,), generator=g)
    sets, ends = [], []
    for extra in (1, 4, 9):
        end = prefix_len - 1 + torch.randint(1, extra + 1, (n,), generator=g)
        toks = torch.randint(0, d_vocab, (n, int(end.max()) + 3), generator=g)
        if sets:
            for i in range(n):
                toks[i, : prefix_len[i]] = sets[0][i, : prefix_len[i]]
        sets.append(toks)
        ends.append(end)
    return sets, ends, prefix_len


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("max_prompts", [2, 100])
def test_end_logits_shared_prefix_equal_each_set_on_its_own(spec, max_prompts):
    """end_logits_shared_prefix (the prefix's keys and values computed once, every set's suffix
    against them) equals the hooked bridge's END logits of each set on its own."""
    model = model_for(spec)
    sets, ends, prefix_len = _prompt_sets_sharing_prefixes(model.cfg.d_vocab, seed=len(spec))
    fast = plain_forward.end_logits_shared_prefix(plain_forward.weights(model), sets, ends, prefix_len,
                                                  max_prompts)
    for toks, end, got in zip(sets, ends, fast):
        want = end_logits(model, toks, end, engine="bridge")
        assert (got - want).abs().max() <= ATOL


def test_end_logits_shared_prefix_checks_the_prefixes():
    model = model_for("random-L2-H4-D64")
    net = plain_forward.weights(model)
    sets, ends, prefix_len = _prompt_sets_sharing_prefixes(model.cfg.d_vocab, seed=0)
    sets[1][0, 0] = (sets[0][0, 0] + 1) % model.cfg.d_vocab
    with pytest.raises(ValueError, match="differ within a prompt's prefix"):
        plain_forward.end_logits_shared_prefix(net, sets, ends, prefix_len, 4)
    with pytest.raises(ValueError, match="1..END tokens"):
        plain_forward.end_logits_shared_prefix(net, sets[:1], [prefix_len - 1], prefix_len, 4)
