"""ioi.patching activation patching == transformer_lens.patching, on tiny random GPT-2 shapes.

Every public function is compared with its TransformerLens namesake (1e-4 absolute) on three
shapes, with and without BOS, on right-padded batches of prompts of different lengths, with a
LogitDiff metric (fast path) and a generic callable reading all positions (full-logits path).
TransformerLens runs are shared between tests (one TL run evaluates both metrics).
"""

from __future__ import annotations

import itertools
import warnings

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp

import ioi.patching as fast
from ioi.metrics import LogitDiff
from ioi.patching import activation as activation_module
from ioi.patching._chunking import shared_prefix_lengths

ATOL = 1e-4
SHAPES = ("random-L2-H4-D16", "random-L3-H2-D8", "random-L1-H3-D12")
# (clean prompt, corrupted prompt: IO, S1, S2 replaced by three other names, IO, S)
PROMPTS = [
    ("When Mary and John went out, John gave a bag to", "When Alice and Bob went out, Kate gave a bag to",
     " Mary", " John"),
    ("Anna and Tom talked. Tom smiled at", "Mary and Jack talked. John smiled at", " Anna", " Tom"),
    ("Then Sarah and Paul met here. Paul waved to", "Then David and Mike met here. Rose waved to",
     " Sarah", " Paul"),
]
LAYER_POS = ("resid_pre", "resid_mid", "attn_out", "mlp_out")
HEAD_KINDS = ("out", "q", "k", "v", "pattern")
TL_ACT = {"out": "z", "q": "q", "k": "k", "v": "v", "pattern": "pattern"}


# ----------------------------------------------------------------------------------------------
# Data, models, metrics
# ----------------------------------------------------------------------------------------------


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows))
    toks = torch.full((len(rows), width), 50256, dtype=torch.long)
    for i, row in enumerate(rows):
        toks[i, : len(row)] = torch.tensor(row)
    return toks


class Batch:
    """Clean/corrupted right-padded tokens, END positions and the two metrics."""

    def __init__(self, tokenizer, bos: bool):
        prefix = [50256] if bos else []
        clean = [prefix + tokenizer(c).input_ids for c, _, _, _ in PROMPTS]
        corrupted = [prefix + tokenizer(x).input_ids for _, x, _, _ in PROMPTS]
        assert [len(a) for a in clean] == [len(b) for b in corrupted]
        assert len({len(a) for a in clean}) == len(clean), "prompts must have different lengths"
        self.clean, self.corrupted = _pad(clean), _pad(corrupted)
        self.end = torch.tensor([len(a) - 1 for a in clean])
        ids = [(tokenizer(io).input_ids, tokenizer(s).input_ids) for _, _, io, s in PROMPTS]
        assert all(len(io) == len(s) == 1 for io, s in ids)
        self.io = torch.tensor([io[0] for io, _ in ids])
        self.s = torch.tensor([s[0] for _, s in ids])
        self.ld = LogitDiff(self.end, self.io, self.s)
        rows, end, io = torch.arange(len(self.end)), self.end, self.io

        def generic(logits: torch.Tensor) -> torch.Tensor:
            # the full vocabulary at END, and one logit at every position, padding included
            return logits[rows, end].log_softmax(-1)[rows, io].mean() + 0.1 * logits[:, :, 50256].mean()

        self.generic = generic
        self.metrics = {"ld": self.ld, "gen": self.generic}

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and two threads crawl on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    from ioi.models import load_model

    return {spec: load_model(spec, device="cpu", seed=0) for spec in SHAPES}


@pytest.fixture(scope="module")
def batches(tokenizer):
    return {bos: Batch(tokenizer, bos) for bos in (False, True)}


@pytest.fixture(scope="module")
def caches(models, batches):
    return {
        (spec, bos): models[spec].run_with_cache(batches[bos].clean)[1]
        for spec in SHAPES for bos in (False, True)
    }


@pytest.fixture(scope="module")
def tl_results(models, batches, caches):
    """Memoised TransformerLens results: key -> [2 (ld, gen), *axes]."""
    store: dict = {}

    def get(spec: str, bos: bool, name: str):
        key = (spec, bos, name)
        if key not in store:
            batch = batches[bos]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = getattr(tlp, name)(models[spec], batch.corrupted, caches[(spec, bos)], batch.metrics)
            store[key] = result.values
        return store[key]

    return get


def _fast(name: str, model, batch: Batch, cache, metric, **kwargs) -> torch.Tensor:
    return getattr(fast, name)(model, batch.corrupted, cache, metric, progress=False, **kwargs)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=ATOL, rtol=0)


CONFIGS = list(itertools.product(SHAPES, (False, True)))
CONFIG_IDS = [f"{spec}-{'bos' if bos else 'nobos'}" for spec, bos in CONFIGS]

# ----------------------------------------------------------------------------------------------
# Equality with transformer_lens.patching
# ----------------------------------------------------------------------------------------------


# the one configuration on which each layer-position sweep is compared over every position
FULL_LAYER_POS = {
    ("random-L2-H4-D16", False): "resid_pre",
    ("random-L3-H2-D8", True): "resid_mid",
    ("random-L1-H3-D12", False): "attn_out",
    ("random-L2-H4-D16", True): "mlp_out",
}


def _tl_layer_pos_subset(model, batch, cache, kind: str, positions: list[int]) -> torch.Tensor:
    """TL's own loop on the (layer, pos) cells at ``positions``: [2, layer, len(pos)]."""
    cells = list(itertools.product(range(model.cfg.n_layers), positions))
    values = tlp.generic_activation_patch(
        model, batch.corrupted, cache, batch.metrics, patch_setter=tlp.layer_pos_patch_setter,
        activation_name=kind, index_df=pd.DataFrame(cells, columns=["layer", "pos"]),
    ).values
    return values.reshape(2, model.cfg.n_layers, len(positions))


def _subset_positions(batch: Batch) -> list[int]:
    """The first changed position of one prompt, the last real token of the shortest prompt
    (END), a position that is padding for that prompt, and the last position."""
    first = int(shared_prefix_lengths(batch.clean, batch.corrupted).max())
    shortest = int(batch.end.min())
    return [first, shortest, shortest + 1, batch.n_pos - 1]


@pytest.mark.parametrize(("spec", "bos"), CONFIGS, ids=CONFIG_IDS)
def test_layer_pos_functions_match_tl(spec, bos, models, batches, caches, tl_results):
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    positions = _subset_positions(batch)
    expected = {}
    for kind in LAYER_POS:
        name = f"get_act_patch_{kind}"
        if FULL_LAYER_POS.get((spec, bos)) == kind:
            full = tl_results(spec, bos, name)
            assert full.shape == (2, model.cfg.n_layers, batch.n_pos)
            for m, metric in enumerate((batch.ld, batch.generic)):
                _close(_fast(name, model, batch, cache, metric), full[m])
            expected[kind] = full[:, :, positions]
        else:
            expected[kind] = _tl_layer_pos_subset(model, batch, cache, kind, positions)
        for m, metric in enumerate((batch.ld, batch.generic)):
            _close(_fast(name, model, batch, cache, metric, positions=positions), expected[kind][m])
    # block_every is TL's stack of resid_pre, attn_out, mlp_out
    for m, metric in enumerate((batch.ld, batch.generic)):
        stacked = torch.stack([expected[k][m] for k in ("resid_pre", "attn_out", "mlp_out")])
        got = _fast("get_act_patch_block_every", model, batch, cache, metric, positions=positions)
        _close(got, stacked)


@pytest.mark.parametrize(("spec", "bos"), CONFIGS, ids=CONFIG_IDS)
def test_head_all_pos_functions_match_tl(spec, bos, models, batches, caches, tl_results):
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    expected = {}
    for kind in HEAD_KINDS:
        name = f"get_act_patch_attn_head_{kind}_all_pos"
        expected[kind] = tl_results(spec, bos, name)
        for m, metric in enumerate((batch.ld, batch.generic)):
            _close(_fast(name, model, batch, cache, metric), expected[kind][m])
    for m, metric in enumerate((batch.ld, batch.generic)):
        stacked = torch.stack([expected[k][m] for k in HEAD_KINDS])
        _close(_fast("get_act_patch_attn_head_all_pos_every", model, batch, cache, metric), stacked)


def _tl_by_pos_subset(model, batch, cache, kind: str, positions: list[int]) -> torch.Tensor:
    """TL's own loop on the (layer, pos, head) cells at ``positions``: [2, layer, len(pos), head]."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if kind == "pattern":
        cells = list(itertools.product(range(n_layers), range(n_heads), positions))
        df = pd.DataFrame(cells, columns=["layer", "head_index", "dest_pos"])
        setter = tlp.layer_head_pos_pattern_patch_setter
    else:
        cells = list(itertools.product(range(n_layers), positions, range(n_heads)))
        df = pd.DataFrame(cells, columns=["layer", "pos", "head"])
        setter = tlp.layer_pos_head_vector_patch_setter
    values = tlp.generic_activation_patch(
        model, batch.corrupted, cache, batch.metrics, patch_setter=setter,
        activation_name=TL_ACT[kind], index_df=df,
    ).values
    if kind == "pattern":
        return values.reshape(2, n_layers, n_heads, len(positions))
    return values.reshape(2, n_layers, len(positions), n_heads)


@pytest.mark.parametrize(("spec", "bos"), CONFIGS, ids=CONFIG_IDS)
def test_head_by_pos_functions_match_tl_on_positions(spec, bos, models, batches, caches):
    """By-position head patching at a real position of every prompt and at a padding position."""
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    shortest_end = int(batch.end.min())
    positions = [shortest_end - 1, shortest_end + 2]  # the latter is padding for one prompt
    expected = {kind: _tl_by_pos_subset(model, batch, cache, kind, positions) for kind in HEAD_KINDS}
    for kind in HEAD_KINDS:
        name = f"get_act_patch_attn_head_{kind}_by_pos"
        for m, metric in enumerate((batch.ld, batch.generic)):
            _close(_fast(name, model, batch, cache, metric, positions=positions), expected[kind][m])
    for m, metric in enumerate((batch.ld, batch.generic)):
        stacked = torch.stack(
            [expected[k][m] if k != "pattern" else expected[k][m].transpose(1, 2) for k in HEAD_KINDS]
        )
        every = _fast("get_act_patch_attn_head_by_pos_every", model, batch, cache, metric, positions=positions)
        _close(every, stacked)


@pytest.mark.parametrize(
    ("spec", "bos", "name"),
    [("random-L2-H4-D16", False, "get_act_patch_attn_head_out_by_pos"),
     ("random-L1-H3-D12", True, "get_act_patch_attn_head_k_by_pos"),
     ("random-L1-H3-D12", False, "get_act_patch_attn_head_pattern_by_pos"),
     ("random-L3-H2-D8", True, "get_act_patch_attn_head_q_by_pos")],
)
def test_by_pos_over_all_positions_matches_tl(spec, bos, name, models, batches, caches, tl_results):
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    expected = tl_results(spec, bos, name)
    for m, metric in enumerate((batch.ld, batch.generic)):
        _close(_fast(name, model, batch, cache, metric), expected[m])


def test_every_functions_match_tl_directly(models, batches, caches):
    """TL's own *_every helpers (not just their parts), on the one-layer shape."""
    spec, bos = "random-L1-H3-D12", False
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    for name in ("get_act_patch_block_every", "get_act_patch_attn_head_all_pos_every",
                 "get_act_patch_attn_head_by_pos_every"):
        expected = getattr(tlp, name)(model, batch.corrupted, cache, batch.ld)
        _close(_fast(name, model, batch, cache, batch.ld), expected)
        # TL's *_every helpers name the metric ``metric``; the keyword works here too
        got = getattr(fast, name)(model=model, corrupted_tokens=batch.corrupted, clean_cache=cache,
                                  metric=batch.ld, progress=False)
        _close(got, expected)


def test_pattern_dest_src_matches_tl(models, batches, caches):
    spec, bos = "random-L1-H3-D12", True
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    positions = [2, int(batch.end.min()), int(batch.end.max())]
    cells = list(itertools.product(range(1), range(3), positions, positions))
    df = pd.DataFrame(cells, columns=["layer", "head_index", "dest_pos", "src_pos"])
    expected = tlp.generic_activation_patch(
        model, batch.corrupted, cache, batch.metrics,
        patch_setter=tlp.layer_head_dest_src_pos_pattern_patch_setter, activation_name="pattern", index_df=df,
    ).values.reshape(2, 1, 3, 3, 3)
    for m, metric in enumerate((batch.ld, batch.generic)):
        got = _fast("get_act_patch_attn_head_pattern_dest_src_pos", model, batch, cache, metric, positions=positions)
        _close(got, expected[m])


def test_normalised_logit_diff_matches_tl(models, batches, caches):
    spec, bos = "random-L3-H2-D8", True
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    clean_ld = float(batch.ld(model(batch.clean)))
    corrupted_ld = float(batch.ld(model(batch.corrupted)))
    metric = batch.ld.with_baselines(clean_ld, corrupted_ld, normalisation="clean_is_one")
    expected = tlp.get_act_patch_resid_pre(model, batch.corrupted, cache, metric)
    _close(_fast("get_act_patch_resid_pre", model, batch, cache, metric), expected)


def test_unfolded_layernorm_with_weights_matches_tl(batches):
    """LayerNorm weights/biases kept in the LNs (fold_ln=False), made non-trivial."""
    from ioi.models import load_model

    model = load_model("random-L2-H4-D16", device="cpu", seed=1, fold_ln=False,
                       center_writing_weights=False, center_unembed=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ln in [model.ln_final] + [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks]:
            weight, bias = ln.original_component.weight, ln.original_component.bias
            weight.copy_(1 + 0.5 * torch.randn(weight.shape, generator=generator))
            bias.copy_(0.2 * torch.randn(bias.shape, generator=generator))
    batch = batches[False]
    _, cache = model.run_with_cache(batch.clean)
    for name in ("get_act_patch_attn_head_all_pos_every", "get_act_patch_block_every"):
        expected = getattr(tlp, name)(model, batch.corrupted, cache, batch.ld)
        _close(_fast(name, model, batch, cache, batch.ld), expected)


# ----------------------------------------------------------------------------------------------
# Properties and options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("spec", ["random-L2-H4-D16", "random-L3-H2-D8"])
def test_patching_a_run_into_itself_changes_nothing(spec, shared_prefix, models, batches):
    model, batch = models[spec], batches[True]
    tokens = batch.corrupted
    _, cache = model.run_with_cache(tokens)
    for metric in (batch.ld, batch.generic):
        unpatched = float(metric(model(tokens)))
        for name in ("get_act_patch_block_every", "get_act_patch_resid_mid",
                     "get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_by_pos_every",
                     "get_act_patch_attn_head_pattern_dest_src_pos"):
            positions = None if metric is batch.ld and "dest_src" not in name else [1, 4, batch.n_pos - 1]
            got = getattr(fast, name)(model, tokens, cache, metric, progress=False, shared_prefix=shared_prefix,
                                      positions=positions)
            torch.testing.assert_close(got, torch.full_like(got, unpatched), atol=ATOL, rtol=0)


def test_clean_tokens_instead_of_a_cache(models, batches, caches):
    spec, bos = "random-L2-H4-D16", True
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    for name in ("get_act_patch_block_every", "get_act_patch_attn_head_all_pos_every"):
        with_cache = _fast(name, model, batch, cache, batch.ld)
        without = getattr(fast, name)(model, batch.corrupted, None, batch.ld, clean_tokens=batch.clean,
                                      progress=False)
        _close(without, with_cache)
    with pytest.raises(ValueError, match="clean_tokens"):
        fast.get_act_patch_resid_pre(model, batch.corrupted, None, batch.ld, progress=False)


def test_results_do_not_depend_on_batching_or_shortcuts(models, batches, caches):
    spec, bos = "random-L3-H2-D8", False
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    for name in ("get_act_patch_block_every", "get_act_patch_attn_head_by_pos_every"):
        reference = _fast(name, model, batch, cache, batch.ld, verify=False)
        for options in ({"batch_size": 1}, {"batch_size": 7}, {"memory_budget_mb": 1e-3},
                        {"shared_prefix": False}, {"clean_tokens": batch.clean}):
            _close(_fast(name, model, batch, cache, batch.ld, **options), reference)


@pytest.mark.parametrize("bos", [False, True])
def test_window_attention_equals_the_full_layout(bos, models, batches, caches, monkeypatch):
    """The resume forward's window attention (queries of the changed rows only, unchanged keys
    shared by the patches) equals its full layout of every patch (every query, unchanged rows
    copied per patch), on sweeps that patch every position and one position per prompt."""
    from ioi.patching import _fast_forward

    spec = "random-L2-H4-D16"
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    for name in ("get_act_patch_attn_head_by_pos_every", "get_act_patch_block_every"):
        monkeypatch.setattr(_fast_forward, "WINDOW_ATTENTION", False)
        reference = _fast(name, model, batch, cache, batch.ld, verify=False)
        monkeypatch.setattr(_fast_forward, "WINDOW_ATTENTION", True)
        _close(_fast(name, model, batch, cache, batch.ld, verify=False), reference)


def test_positions_select_columns_of_the_full_sweep(models, batches, caches):
    spec, bos = "random-L2-H4-D16", True
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    full = _fast("get_act_patch_attn_head_by_pos_every", model, batch, cache, batch.ld)
    cols = [5, 0, 3]
    for positions in (cols, torch.tensor(cols), {"a": 5, "b": 0, "c": torch.full((3,), 3)}):
        sub = _fast("get_act_patch_attn_head_by_pos_every", model, batch, cache, batch.ld, positions=positions)
        _close(sub, full[:, :, cols])
    sub = _fast("get_act_patch_attn_head_pattern_by_pos", model, batch, cache, batch.ld, positions=cols)
    _close(sub, _fast("get_act_patch_attn_head_pattern_by_pos", model, batch, cache, batch.ld)[:, :, cols])


def _manual_per_prompt(model, tokens, cache, metric, hook_name: str, positions: torch.Tensor, head=None):
    """Reference for per-prompt positions: prompt n patched at its own position positions[n]."""
    rows = torch.arange(len(positions))

    def hook(act, hook):
        act = act.clone()
        if head is None:
            act[rows, positions] = cache[hook.name][rows, positions]
        else:
            act[rows, positions, head] = cache[hook.name][rows, positions, head]
        return act

    return float(metric(model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])))


def test_per_prompt_positions_match_a_manual_patch(models, batches, caches):
    """positions={"S2": ..., "END": ...}: each prompt patched at its own S2 / END position."""
    spec, bos = "random-L2-H4-D16", False
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    s2 = batch.end - 3  # an IOI-like "own position" that differs between prompts
    positions = {"S2": s2, "END": batch.end}
    for metric in (batch.ld, batch.generic):
        resid = _fast("get_act_patch_resid_pre", model, batch, cache, metric, positions=positions)
        heads = _fast("get_act_patch_attn_head_by_pos_every", model, batch, cache, metric, positions=positions)
        assert resid.shape == (2, 2) and heads.shape == (5, 2, 2, 4)
        for layer, (e, pos) in itertools.product(range(2), enumerate(positions.values())):
            expected = _manual_per_prompt(model, batch.corrupted, cache, metric,
                                          f"blocks.{layer}.hook_resid_pre", pos)
            assert abs(resid[layer, e].item() - expected) <= ATOL
            for head in (0, 3):
                expected = _manual_per_prompt(model, batch.corrupted, cache, metric,
                                              f"blocks.{layer}.attn.hook_v", pos, head)
                assert abs(heads[3, layer, e, head].item() - expected) <= ATOL


def test_per_prompt_logit_diff_keeps_a_prompt_axis(models, batches, caches):
    spec, bos = "random-L1-H3-D12", True
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    per_prompt = LogitDiff(batch.end, batch.io, batch.s, per_prompt=True)
    got = _fast("get_act_patch_attn_head_all_pos_every", model, batch, cache, per_prompt)
    mean = _fast("get_act_patch_attn_head_all_pos_every", model, batch, cache, batch.ld)
    assert got.shape == (*mean.shape, 3)
    _close(got.mean(-1), mean)


def test_unsupported_models_fall_back_to_transformer_lens(models, batches, caches, monkeypatch):
    spec, bos = "random-L1-H3-D12", False
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    monkeypatch.setattr(activation_module, "unsupported_reason", lambda model: "pretend")
    with pytest.warns(UserWarning, match="pretend"):
        got = fast.get_act_patch_attn_head_out_all_pos(model, batch.corrupted, cache, batch.ld)
    expected = tlp.get_act_patch_attn_head_out_all_pos(model, batch.corrupted, cache, batch.ld)
    _close(got, expected)
    with pytest.raises(NotImplementedError):
        fast.get_act_patch_resid_pre(model, batch.corrupted, cache, batch.ld, positions=[0])


def test_verify_catches_a_wrong_reimplementation(models, batches, caches, monkeypatch):
    spec, bos = "random-L1-H3-D12", False
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    real = activation_module.net_weights

    def broken(model, device=None):
        import dataclasses

        net = real(model, device)
        return dataclasses.replace(net, W_pos=net.W_pos * 3)

    monkeypatch.setattr(activation_module, "net_weights", broken)
    with pytest.raises(RuntimeError, match="differs"):
        _fast("get_act_patch_attn_head_out_all_pos", model, batch, cache, batch.ld)


def test_argument_errors(models, batches, caches):
    spec, bos = "random-L1-H3-D12", False
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    with pytest.raises(ValueError, match="positions"):
        _fast("get_act_patch_resid_pre", model, batch, cache, batch.ld, positions=[batch.n_pos])
    with pytest.raises(TypeError, match="unexpected"):
        _fast("get_act_patch_resid_pre", model, batch, cache, batch.ld, reduce="none")
    with pytest.raises(TypeError, match="patching_metric"):
        fast.get_act_patch_resid_pre(model, batch.corrupted, cache)
    with pytest.raises(ValueError, match="prompts"):
        _fast("get_act_patch_resid_pre", model, batch, cache, batch.ld[:2])


def test_shared_prefix_lengths_from_tokens_or_embeddings(models, batches, caches):
    batch = batches[True]
    from_tokens = shared_prefix_lengths(batch.clean, batch.corrupted)
    assert from_tokens.tolist() == [2, 1, 2]  # BOS + "When"/"Then"; prompt 2 starts with a name
    model, cache = models["random-L2-H4-D16"], caches[("random-L2-H4-D16", True)]
    _, corrupted_cache = model.run_with_cache(batch.corrupted)
    from_embed = shared_prefix_lengths(
        None, batch.corrupted, cache["blocks.0.hook_resid_pre"], corrupted_cache["blocks.0.hook_resid_pre"]
    )
    assert from_embed.tolist() == from_tokens.tolist()


def test_progress_bar_and_device_option(models, batches, caches, capsys):
    spec, bos = "random-L1-H3-D12", False
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    got = fast.get_act_patch_resid_pre(model, batch.corrupted, cache, batch.ld, progress=True, device="cpu")
    assert "get_act_patch_resid_pre" in capsys.readouterr().err
    assert got.device.type == "cpu" and not got.is_inference()


@pytest.mark.parametrize("tile", [1, 5])
def test_cpu_mlp_row_tiles_match_tl(tile, models, batches, caches, tl_results, monkeypatch):
    """The CPU MLP row tiling (normally 1024 rows, more than these small batches hold) forced down
    to ``tile`` rows: the head and block sweeps still equal TransformerLens."""
    import ioi.patching._fast_forward as ff

    monkeypatch.setattr(ff, "MLP_ROW_TILE", tile)
    spec, bos = "random-L2-H4-D16", True
    model, batch, cache = models[spec], batches[bos], caches[(spec, bos)]
    for name in ("get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_v_all_pos",
                 "get_act_patch_resid_pre"):
        expected = tl_results(spec, bos, name)
        for m, metric in enumerate((batch.ld, batch.generic)):
            _close(_fast(name, model, batch, cache, metric), expected[m])
