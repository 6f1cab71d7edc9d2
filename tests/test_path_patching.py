"""Path patching: the fast implementation equals the seed-style hook reference, plus properties.

Models are tiny random GPT-2 shapes built with a larger initialisation scale (0.2 instead of
0.02), so that attention is sharp and path-patching effects are O(0.1-1) rather than O(1e-3):
a 1e-4 tolerance then actually discriminates. One check uses the standard ``load_model`` weights.
Batches are IOI-like prompts of different lengths, right-padded with 50256, optionally with BOS.
"""

from __future__ import annotations

import pytest
import torch

from ioi.ablation import head_knockout
from ioi.metrics import LogitDiff
from ioi.models import load_model
from ioi.patching.path import (
    PathPatchResult,
    path_patch_to_heads,
    path_patch_to_logits,
    positions_mask,
    prepare_path_patching,
)
from ioi.patching.reference import ref_path_patch_to_heads, ref_path_patch_to_logits
from ioi_batches import make_batch, sharp_model

ATOL = 1e-4
SHAPES = ("random-L3-H4-D16", "random-L4-H2-D8", "random-L2-H3-D12")
pytestmark = pytest.mark.usefixtures("one_thread")


def ld_metric(word_idx, io, s, **kw) -> LogitDiff:
    return LogitDiff(word_idx["END"], io, s, **kw)


class AllPositionsMetric:
    """A generic metric (not a LogitDiff) that reads every position of the logits."""

    def __init__(self, word_idx, io, s):
        self.ld = LogitDiff(word_idx["END"], io, s)
        self.io = io

    def __call__(self, logits):
        return self.ld(logits) + 0.05 * logits[:, :, self.io[0]].mean() - 0.03 * logits[:, :, 262].std()


def assert_close(fast, ref, atol=ATOL):
    assert fast.shape == ref.shape
    assert torch.equal(fast.isnan(), ref.isnan())
    diff = (fast - ref).nan_to_num().abs().max().item()
    assert diff <= atol, diff


def spread(ref):
    """Range of the finite entries: the test is only meaningful when effects are >> ATOL."""
    finite = ref[~ref.isnan()]
    return (finite.max() - finite.min()).item()


# ----------------------------------------------------------------------------------------------
# Fast == reference
# ----------------------------------------------------------------------------------------------

LOGIT_CASES = [
    # (shape, bos, positions key, senders)
    ("random-L3-H4-D16", False, None, "heads"),
    ("random-L3-H4-D16", True, "END", "mlps"),
    ("random-L4-H2-D8", True, None, "heads"),
    ("random-L4-H2-D8", False, "S2+END", "heads"),
    ("random-L2-H3-D12", False, "END", "both"),
    ("random-L2-H3-D12", True, "S2+END", "mlps"),
]


def _positions(key, word_idx):
    if key is None:
        return None
    if key == "S2+END":
        return {"S2": word_idx["S2"], "END": word_idx["END"]}
    if key == "S1+1":
        return word_idx["S1+1"]
    return word_idx[key]


@pytest.mark.parametrize("shape,bos,pos_key,senders", LOGIT_CASES)
def test_logits_fast_equals_reference_logit_diff(shape, bos, pos_key, senders):
    model = sharp_model(shape)
    toks, new, wi, io, s, _ = make_batch(4, bos)
    metric = ld_metric(wi, io, s)
    kw = dict(sender_positions=_positions(pos_key, wi), senders=senders, progress=False)
    fast = path_patch_to_logits(model, toks, new, metric, **kw)
    ref = ref_path_patch_to_logits(model, toks, new, metric, **kw)
    if senders == "both":
        assert isinstance(fast, PathPatchResult)
        assert_close(fast.heads, ref.heads)
        assert_close(fast.mlps, ref.mlps)
        assert spread(ref.heads) > 1e-2
    else:
        assert_close(fast, ref)
        assert spread(ref) > 1e-2


@pytest.mark.parametrize("shape,bos,pos_key", [("random-L2-H3-D12", True, "S2+END")])
def test_logits_fast_equals_reference_generic_metric(shape, bos, pos_key):
    """A callable reading every position takes the exact full-logits path."""
    model = sharp_model(shape)
    toks, new, wi, io, s, _ = make_batch(4, bos)
    metric = AllPositionsMetric(wi, io, s)
    kw = dict(sender_positions=_positions(pos_key, wi), senders="both", progress=False)
    fast = path_patch_to_logits(model, toks, new, metric, **kw)
    ref = ref_path_patch_to_logits(model, toks, new, metric, **kw)
    assert_close(fast.heads, ref.heads)
    assert_close(fast.mlps, ref.mlps)


# The reference costs two forward passes per sender: on the largest shape it runs on a subset.
SUBSET_L3 = [(0, 0), (0, 3), (1, 1), (1, 2), (1, 3)]

HEAD_CASES = [
    # (shape, bos, receivers, input, sender positions, receiver positions)
    ("random-L3-H4-D16", False, [(2, 1), (1, 3)], "q", "END", "END"),
    ("random-L3-H4-D16", True, [(2, 0), (2, 3)], "v", "S2", "S2"),
    ("random-L4-H2-D8", True, [(3, 1), (2, 0)], "k", "S1+1", "S1+1"),
    ("random-L4-H2-D8", False, [(3, 0)], "v", None, None),
    ("random-L2-H3-D12", False, [(1, 2)], "k", None, "S2"),
    ("random-L2-H3-D12", True, [(1, 0), (1, 1)], "q", "S2+END", None),
]


@pytest.mark.parametrize("shape,bos,receivers,which,sp,rp", HEAD_CASES)
def test_heads_fast_equals_reference(shape, bos, receivers, which, sp, rp):
    model = sharp_model(shape)
    toks, new, wi, io, s, _ = make_batch(4, bos)
    metric = ld_metric(wi, io, s)
    kw = dict(sender_positions=_positions(sp, wi), receiver_positions=_positions(rp, wi), progress=False)
    fast = path_patch_to_heads(model, toks, new, metric, receivers, which, **kw)
    subset = SUBSET_L3 if shape == "random-L3-H4-D16" else None
    ref = ref_path_patch_to_heads(model, toks, new, metric, receivers, which, sender_subset=subset, **kw)
    if subset is not None:
        rows, cols = zip(*subset)
        assert_close(fast[list(rows), list(cols)], ref[list(rows), list(cols)])
    else:
        assert_close(fast, ref)
    max_layer = max(l for l, _ in receivers)
    assert fast[:max_layer].isnan().sum() == 0
    assert fast[max_layer:].isnan().all()
    assert spread(fast) > 1e-3


@pytest.mark.parametrize("which,rp", [("v", "S2")])
def test_heads_fast_equals_reference_generic_metric(which, rp):
    model = sharp_model("random-L3-H4-D16")
    toks, new, wi, io, s, _ = make_batch(4, True)
    metric = AllPositionsMetric(wi, io, s)
    kw = dict(sender_positions=None, receiver_positions=_positions(rp, wi), senders="both", progress=False)
    fast = path_patch_to_heads(model, toks, new, metric, [(2, 1), (1, 0)], which, **kw)
    subset = [(0, 1), (1, 3), (0, None), (1, None)]  # the reference on a few senders (slow)
    ref = ref_path_patch_to_heads(model, toks, new, metric, [(2, 1), (1, 0)], which, sender_subset=subset, **kw)
    for layer, head in subset:
        got, want = (fast.heads[layer, head], ref.heads[layer, head]) if head is not None else (fast.mlps[layer], ref.mlps[layer])
        assert abs(got.item() - want.item()) <= ATOL


def test_standard_init_model_and_per_prompt_metric():
    """The plain load_model weights, and a per-prompt, normalised LogitDiff ([L, H, N] result)."""
    model = load_model("random-L2-H3-D12", device="cpu")
    toks, new, wi, io, s, _ = make_batch(4, False)
    metric = ld_metric(wi, io, s, per_prompt=True)
    fast = path_patch_to_logits(model, toks, new, metric, progress=False)
    ref = ref_path_patch_to_logits(model, toks, new, metric, progress=False)
    assert fast.shape == (2, 3, 4)
    assert_close(fast, ref, atol=1e-5)
    clean = ld_metric(wi, io, s)(model(toks)).item()
    norm = ld_metric(wi, io, s, normalisation="percent_change", clean=clean)
    fast_q = path_patch_to_heads(model, toks, new, norm, [(1, 1)], "q", progress=False)
    ref_q = ref_path_patch_to_heads(model, toks, new, norm, [(1, 1)], "q", progress=False)
    assert_close(fast_q, ref_q, atol=1e-3)  # percentages: 1e-3 % of a tiny clean LD


def test_knockout_and_freeze_mlps_match_reference():
    """Fig. 15 (path patching after mean-ablating heads at END) and the freeze_mlps option."""
    model = sharp_model("random-L3-H4-D16")
    toks, new, wi, io, s, groups = make_batch(4, True)
    metric = ld_metric(wi, io, s)
    from ioi.ablation import compute_template_means

    means = compute_template_means(model, new, groups)
    ko = head_knockout(means, {(1, 2): wi["END"], (2, 0): wi["END"], (0, 1): [wi["S2"], wi["S1+1"]]})
    fast = path_patch_to_logits(model, toks, new, metric, knockout=ko, senders="both", progress=False)
    ref = ref_path_patch_to_logits(model, toks, new, metric, knockout=ko, progress=False)
    assert_close(fast.heads, ref)
    plain = path_patch_to_logits(model, toks, new, metric, progress=False)
    assert (plain - fast.heads).abs().max() > 1e-3  # the knockout matters
    assert fast.heads[2, 0].item() == pytest.approx(metric(model.run_with_hooks(toks, fwd_hooks=ko.hooks())).item(), abs=ATOL)
    fast_h = path_patch_to_heads(model, toks, new, metric, [(2, 1)], "v", knockout=ko,
                                 sender_positions=wi["S2"], receiver_positions=wi["S2"], progress=False)
    subset = SUBSET_L3[1:4]
    ref_h = ref_path_patch_to_heads(model, toks, new, metric, [(2, 1)], "v", knockout=ko, sender_subset=subset,
                                    sender_positions=wi["S2"], receiver_positions=wi["S2"], progress=False)
    rows, cols = zip(*subset)
    assert_close(fast_h[list(rows), list(cols)], ref_h[list(rows), list(cols)])
    small = sharp_model("random-L2-H3-D12")
    fast_f = path_patch_to_logits(small, toks, new, metric, freeze_mlps=True, senders="both", progress=False)
    ref_f = ref_path_patch_to_logits(small, toks, new, metric, freeze_mlps=True, senders="both", progress=False)
    assert_close(fast_f.heads, ref_f.heads)
    assert_close(fast_f.mlps, ref_f.mlps)


# ----------------------------------------------------------------------------------------------
# Properties and independent checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_patching_a_dataset_into_itself_changes_nothing(shape):
    model = sharp_model(shape)
    toks, _, wi, io, s, _ = make_batch(5, True)
    metric = ld_metric(wi, io, s)
    clean = metric(model(toks)).item()
    both = path_patch_to_logits(model, toks, toks, metric, senders="both", progress=False)
    assert torch.allclose(both.heads, torch.full_like(both.heads, clean), atol=ATOL)
    assert torch.allclose(both.mlps, torch.full_like(both.mlps, clean), atol=ATOL)
    L = model.cfg.n_layers
    heads = path_patch_to_heads(model, toks, toks, metric, [(L - 1, 0)], "k", progress=False)
    assert torch.allclose(heads[: L - 1], torch.full_like(heads[: L - 1], clean), atol=ATOL)


def test_one_layer_model_path_patching_equals_activation_patching():
    """With one layer, no head reads another: path patching to the logits is activation patching."""
    model = sharp_model("random-L1-H3-D12")
    toks, new, wi, io, s, _ = make_batch(5, False)
    metric = ld_metric(wi, io, s)
    _, new_cache = model.run_with_cache(new, names_filter=lambda n: n == "blocks.0.attn.hook_z")
    z_new = new_cache["blocks.0.attn.hook_z"]
    end = wi["END"]
    for positions in (None, end):
        fast = path_patch_to_logits(model, toks, new, metric, sender_positions=positions, progress=False)
        for head in range(3):
            def patch(z, hook, head=head):
                if positions is None:
                    z[:, :, head] = z_new[:, :, head]
                else:
                    rows = torch.arange(len(end))
                    z[rows, end, head] = z_new[rows, end, head]
                return z

            logits = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_z", patch)])
            assert abs(fast[0, head].item() - metric(logits).item()) <= ATOL
        assert spread(fast) > 1e-2


def test_chunking_and_cache_reuse_give_identical_results():
    model = sharp_model("random-L3-H4-D16")
    toks, new, wi, io, s, _ = make_batch(5, True)
    metric = ld_metric(wi, io, s)
    base = path_patch_to_logits(model, toks, new, metric, senders="both", progress=False)
    tiny = path_patch_to_logits(model, toks, new, metric, senders="both", memory_budget_mb=1e-3, progress=True)
    cache = prepare_path_patching(model, toks, new)
    cached = path_patch_to_logits(model, toks, new, metric, senders="both", cache=cache, progress=False)
    for other in (tiny, cached):
        assert_close(other.heads, base.heads, atol=1e-6)
        assert_close(other.mlps, base.mlps, atol=1e-6)
    args = (model, toks, new, metric, [(2, 1), (2, 2)], "v")
    kw = dict(sender_positions=wi["S2"], receiver_positions=wi["S2"], progress=False)
    h_base = path_patch_to_heads(*args, **kw)
    h_chunk = path_patch_to_heads(*args, max_senders_per_batch=5, **kw)
    h_cached = path_patch_to_heads(*args, cache=cache, **kw)
    assert_close(h_chunk, h_base, atol=1e-6)
    assert_close(h_cached, h_base, atol=1e-6)
    with pytest.raises(ValueError, match="cache"):
        path_patch_to_logits(model, toks, toks, metric, cache=cache, progress=False)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def test_receiver_validation_and_nan_layout():
    model = sharp_model("random-L3-H4-D16")
    toks, new, wi, io, s, _ = make_batch(3, False)
    metric = ld_metric(wi, io, s)
    for receivers, which in (([], "q"), ([(3, 0)], "q"), ([(0, 4)], "v"), ([(-1, 0)], "k"), ([(1, 0)], "z")):
        with pytest.raises(ValueError):
            path_patch_to_heads(model, toks, new, metric, receivers, which, progress=False)
        with pytest.raises(ValueError):
            ref_path_patch_to_heads(model, toks, new, metric, receivers, which, progress=False)
    # A receiver in layer 0: no sender can reach it -> all NaN (not an error).
    out = path_patch_to_heads(model, toks, new, metric, [(0, 1)], "q", progress=False)
    assert out.shape == (3, 4) and out.isnan().all()
    with pytest.raises(ValueError):
        path_patch_to_logits(model, toks, new[:, :-1], metric, progress=False)
    with pytest.raises(ValueError):
        path_patch_to_logits(model, toks, new, metric, senders="attn", progress=False)
    with pytest.raises(ValueError):
        path_patch_to_logits(model, toks, new, metric, sender_positions=torch.full((3,), 99), progress=False)
    with pytest.raises(ValueError):
        path_patch_to_logits(model, toks[:2], new[:2], metric, progress=False)


def test_positions_mask_is_per_prompt():
    pos = torch.tensor([1, 3])
    mask = positions_mask(pos, 2, 5)
    assert mask.tolist() == [[False, True, False, False, False], [False, False, False, True, False]]
    both = positions_mask({"a": pos, "b": torch.tensor([0, 0])}, 2, 5)
    assert both.sum().item() == 4 and both[0, 0] and both[1, 3] and not both[0, 3]
    assert positions_mask(None, 2, 5).all()


def test_packed_forward_equals_the_dense_pass_at_every_computed_row():
    """``_forward_cache(last=END)`` skips right padding and positions after END, and with
    ``last_layer_last_row_only`` computes the last layer past its keys/values at END alone: every
    kept activation equals the dense pass where computed and is zero elsewhere (with a knockout)."""
    from ioi.ablation import Ablation, mlp_knockout
    from ioi.patching.path import _all_names, _forward_cache, _Net

    model = sharp_model("random-L3-H4-D16")
    net = _Net.from_model(model)
    toks, new, wi, io, s, groups = make_batch(6, True)
    N, S = toks.shape
    L, H, dh, D = net.n_layers, net.n_heads, net.d_head, net.d_model
    gen = torch.Generator().manual_seed(1)
    heads = head_knockout(torch.randn(N, S, L, H, dh, generator=gen), {(1, 2): wi["END"], (2, 0): None})
    mlps = mlp_knockout(torch.randn(N, S, L, D, generator=gen), [2], wi["END"])
    ko = Ablation(head_keep=heads.head_keep, head_means=heads.head_means,
                  mlp_keep=mlps.mlp_keep, mlp_means=mlps.mlp_means)
    end = wi["END"]
    assert int(end.min()) < S - 2  # the batch has padding / positions after END to skip
    names = _all_names(L)
    dense = _forward_cache(net, toks, names, ko)
    packed = _forward_cache(net, toks, names, ko, last=end)
    trimmed = _forward_cache(net, toks, names, ko, last=end, last_layer_last_row_only=True)
    computed = torch.arange(S)[None, :] <= end[:, None]
    at_end = torch.zeros(N, S, dtype=torch.bool)
    at_end[torch.arange(N), end] = True
    for name in sorted(names):
        full_rows = not name.startswith(f"blocks.{L - 1}.") or name.endswith(("hook_k", "hook_v", "hook_resid_pre"))
        for cache, rows in ((packed, computed), (trimmed, computed if full_rows else at_end)):
            assert (cache[name][rows] - dense[name][rows]).abs().max().item() <= ATOL, name
            assert not cache[name][~rows].any(), name
    # the knockout did change the run (so the comparison covers its application)
    plain = _forward_cache(net, toks, names)
    assert (plain[f"blocks.{L - 1}.hook_resid_post"] - dense[f"blocks.{L - 1}.hook_resid_post"]).abs().max() > 1e-2


def test_cpu_mlp_row_tiles_match_reference(monkeypatch):
    """Path patching with the CPU MLP row tiles forced down to 3 rows (normally 1024, more than
    these small batches hold) still equals the seed-style reference."""
    import ioi.patching._fast_forward as ff

    monkeypatch.setattr(ff, "MLP_ROW_TILE", 3)
    model = sharp_model("random-L3-H4-D16")
    toks, new, wi, io, s, _ = make_batch(5, True)
    metric = ld_metric(wi, io, s)
    fast = path_patch_to_logits(model, toks, new, metric, senders="both", progress=False)
    ref = ref_path_patch_to_logits(model, toks, new, metric, senders="both", progress=False)
    assert_close(fast.heads, ref.heads)
    assert_close(fast.mlps, ref.mlps)
    generic = AllPositionsMetric(wi, io, s)
    assert_close(path_patch_to_logits(model, toks, new, generic, progress=False),
                 ref_path_patch_to_logits(model, toks, new, generic, progress=False))
    fast_h = path_patch_to_heads(model, toks, new, metric, [(2, 1)], "q", sender_positions=wi["END"],
                                 receiver_positions=wi["END"], progress=False)
    ref_h = ref_path_patch_to_heads(model, toks, new, metric, [(2, 1)], "q", sender_positions=wi["END"],
                                    receiver_positions=wi["END"], progress=False)
    assert_close(fast_h, ref_h)


# ----------------------------------------------------------------------------------------------
# Step 3's exact shortcuts (first receiver layer: receivers' attention + low-rank MLP; last layer
# for a LogitDiff: no key/value projection of the window) -- receivers below the last layer
# ----------------------------------------------------------------------------------------------

WINDOW_CASES = [
    # (shape, bos, receivers, input, position key): fig13b / fig5b / fig4b-like
    ("random-L4-H2-D8", True, [(1, 1), (2, 0)], "k", "S1+1"),
    ("random-L3-H4-D16", False, [(1, 0), (1, 2)], "v", "S2"),
    ("random-L4-H2-D8", False, [(2, 1)], "q", "END"),
]


@pytest.mark.parametrize("shape,bos,receivers,which,pos_key", WINDOW_CASES)
def test_window_shortcuts_equal_reference(shape, bos, receivers, which, pos_key):
    model = sharp_model(shape)
    toks, new, wi, io, s, _ = make_batch(4, bos)
    metric = ld_metric(wi, io, s)
    pos = _positions(pos_key, wi)
    kw = dict(sender_positions=pos, receiver_positions=pos, progress=False)
    fast = path_patch_to_heads(model, toks, new, metric, receivers, which, **kw)
    subset = [(0, 0), (0, 1), (1, 0)] if shape == "random-L3-H4-D16" else None
    ref = ref_path_patch_to_heads(model, toks, new, metric, receivers, which, sender_subset=subset, **kw)
    if subset is not None:
        rows, cols = zip(*subset)
        fast, ref = fast[list(rows), list(cols)], ref[list(rows), list(cols)]
    assert_close(fast, ref)
    assert spread(ref) > 1e-3


def test_window_shortcuts_planted_model_equal_reference_and_repeat_bit_identically():
    """The planted circuit's induction keys at S1+1 and S-inhibition values at S2."""
    from ioi.data import IOIDataset

    model = load_model("planted-ioi", device="cpu")
    ioi = IOIDataset(N=4, seed=1, tokenizer=model.tokenizer)
    abc = ioi.abc_dataset()
    metric = LogitDiff.from_dataset(ioi)
    for receivers, which, key in (([(1, 2)], "k", "S1+1"), ([(2, 0)], "v", "S2")):
        pos = ioi.word_idx[key]
        kw = dict(sender_positions=pos, receiver_positions=pos, progress=False)
        fast = path_patch_to_heads(model, ioi.toks, abc.toks, metric, receivers, which, **kw)
        again = path_patch_to_heads(model, ioi.toks, abc.toks, metric, receivers, which, **kw)
        assert torch.equal(fast.nan_to_num(), again.nan_to_num())
        subset = [(0, h) for h in range(4)] if which == "k" else [(0, 0), (1, 2), (1, 3)]
        ref = ref_path_patch_to_heads(model, ioi.toks, abc.toks, metric, receivers, which,
                                      sender_subset=subset, **kw)
        rows, cols = zip(*subset)
        assert_close(fast[list(rows), list(cols)], ref[list(rows), list(cols)])
        assert spread(ref[list(rows), list(cols)]) > 1e-3


@pytest.mark.parametrize("bq,bk,heads", [(1, 3, [0, 2]), (3, 1, None), (3, 3, None), (1, 1, [1])])
def test_window_attention_equals_one_softmax_over_prefix_and_window(bq, bk, heads):
    """Step 3's window attention (prefix keys/values from the cache shared by every sender, the
    window's own per sender) equals a plain causal softmax over the concatenated keys, whichever
    of queries or keys/values carry the senders' batch axis."""
    import types

    from ioi.patching.path import _Cache, _Gather, _window_attention

    g = torch.Generator().manual_seed(0)
    n, S, H, dh, W = 2, 7, 3, 4, 3
    a = torch.tensor([2, 4])  # each prompt's first window position (its prefix length)
    K_pre, V_pre = torch.randn(n, S, H, dh, generator=g), torch.randn(n, S, H, dh, generator=g)
    oc = _Gather(_Cache({"blocks.0.attn.hook_k": K_pre, "blocks.0.attn.hook_v": V_pre}, None), torch.arange(n))
    h = H if heads is None else len(heads)
    q = torch.randn(bq, n, W, h, dh, generator=g)
    kk, v = torch.randn(bk, n, W, h, dh, generator=g), torch.randn(bk, n, W, h, dh, generator=g)
    pre_bias = torch.zeros(n, S).masked_fill(torch.arange(S)[None] >= a[:, None], float("-inf"))
    win_bias = torch.zeros(W, W).masked_fill(~torch.ones(W, W, dtype=torch.bool).tril(), float("-inf"))
    z = _window_attention(types.SimpleNamespace(scale=2.0), oc, 0, heads, q, kk, v, pre_bias, win_bias)
    B = max(bq, bk)
    assert z.shape == (B, n, W, h, dh)
    cols = list(range(H)) if heads is None else heads
    for b in range(B):
        for i in range(n):
            keys = torch.cat([K_pre[i, : a[i], cols], kk[min(b, bk - 1), i]])  # [a + W, h, dh]
            vals = torch.cat([V_pre[i, : a[i], cols], v[min(b, bk - 1), i]])
            for r in range(W):
                scores = torch.einsum("he,khe->hk", q[min(b, bq - 1), i, r], keys[: a[i] + r + 1]) / 2.0
                want = torch.einsum("hk,khe->he", scores.softmax(-1), vals[: a[i] + r + 1])
                torch.testing.assert_close(z[b, i, r], want, atol=1e-5, rtol=0)
