"""Mean ablation / knockouts: template-wise means, circuit masks, F(C), F(C\\K), F(M\\K), F(M), MLPs."""

from __future__ import annotations

import pytest
import torch

from ioi.ablation import (
    Ablation,
    ablate_circuit,
    circuit_keep_mask,
    circuit_positions,
    completeness_pair,
    compute_template_means,
    evaluate_circuit,
    expand_group_means,
    head_knockout,
    knockout_heads,
    knockout_mlps,
    mlp_knockout,
    mlp_knockout_sweep,
    run_with_ablation,
)
from ioi.metrics import LogitDiff
from ioi_batches import make_batch as shared_make_batch
from ioi_batches import sharp_model

ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(n: int = 6, bos: bool = False, seed: int = 0):
    """IOI-like prompts of two lengths (right-padded) + a position-aligned ABC batch + groups."""
    return shared_make_batch(n, bos, seed, n_names=12, n_templates=2)


def setup(bos=False, n=6, spec="random-L3-H4-D16"):
    model = sharp_model(spec)
    toks, new, wi, io, s, groups = make_batch(n, bos)
    metric = LogitDiff(wi["END"], io, s)
    return model, toks, new, wi, metric, groups


def z_cache(model, toks):
    L = model.cfg.n_layers
    _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("attn.hook_z"))
    return torch.stack([cache[f"blocks.{l}.attn.hook_z"] for l in range(L)], dim=2)  # [N, S, L, H, dh]


def paper_style_circuit_hooks(model, means, circuit, n_prompts):
    """Independent check, the paper code's way: a Python loop over prompts, head by head."""
    L, H = model.cfg.n_layers, model.cfg.n_heads

    def hook(z, hook):
        layer = hook.layer()
        out = means[:, : z.shape[1], layer].clone()
        for (l, h), positions in circuit.items():
            if l != layer:
                continue
            plist = positions if isinstance(positions, (list, tuple)) else [positions]
            for i in range(n_prompts):
                for pos in plist:
                    out[i, int(pos[i]), h] = z[i, int(pos[i]), h]
        return out

    return [(f"blocks.{l}.attn.hook_z", hook) for l in range(L)]


# ----------------------------------------------------------------------------------------------
# Means
# ----------------------------------------------------------------------------------------------


def test_template_means_are_per_group_per_position():
    model, toks, new, wi, metric, groups = setup()
    acts = z_cache(model, new)
    means = compute_template_means(model, new, groups)
    assert means.shape == acts.shape
    for g in groups:  # the means come from the plain-tensor forward: fp32 rounding against the bridge
        want = acts[g].mean(0)
        for i in g.tolist():
            assert torch.allclose(means[i], want, atol=ATOL, rtol=0)
    per_group = compute_template_means(model, new, groups, per_prompt=False)
    assert per_group.shape == (len(groups), *acts.shape[1:])
    assert torch.allclose(expand_group_means(per_group, groups, len(toks)), means)
    batched = compute_template_means(model, new, groups, batch_size=4)
    assert torch.allclose(batched, means, atol=1e-6)
    mlp = compute_template_means(model, new, groups, component="mlp_out")
    assert mlp.shape == (len(toks), toks.shape[1], model.cfg.n_layers, model.cfg.d_model)
    with pytest.raises(ValueError):
        compute_template_means(model, new, [groups[0]])  # not a partition: per-prompt impossible
    with pytest.raises(ValueError):
        compute_template_means(model, new, groups, component="resid")


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


def test_knocking_out_nothing_gives_full_model():
    model, toks, new, wi, metric, groups = setup(bos=True)
    means = compute_template_means(model, new, groups)
    f_m = metric(model(toks)).item()
    assert evaluate_circuit(model, toks, metric, means, None).item() == pytest.approx(f_m, abs=1e-6)
    assert knockout_heads(model, toks, metric, means, {}).item() == pytest.approx(f_m, abs=1e-6)
    assert head_knockout(means, {}).n_ablated() == 0 and head_knockout(means, {}).hooks() == []
    assert evaluate_circuit(model, toks, metric, means, {(2, 1): wi["END"]}, knockout=[],
                            knockout_mode="relevant_positions").item() == pytest.approx(f_m, abs=1e-6)
    f_c, f_mk = completeness_pair(model, toks, metric, means, {(2, 1): wi["END"]}, [])
    assert f_mk.item() == pytest.approx(f_m, abs=1e-6)
    assert f_c.item() == pytest.approx(evaluate_circuit(model, toks, metric, means, {(2, 1): wi["END"]}).item(), abs=1e-6)


def test_means_equal_to_activations_give_full_model():
    """Reference = the input itself, one group per prompt: ablating anything changes nothing."""
    model, toks, new, wi, metric, groups = setup()
    singletons = [torch.tensor([i]) for i in range(len(toks))]
    means = compute_template_means(model, toks, singletons)
    f_m = metric(model(toks)).item()
    circuit = {(0, 1): wi["S1+1"], (1, 2): wi["S2"], (2, 3): wi["END"]}
    assert evaluate_circuit(model, toks, metric, means, circuit).item() == pytest.approx(f_m, abs=ATOL)
    assert evaluate_circuit(model, toks, metric, means, {}).item() == pytest.approx(f_m, abs=ATOL)
    mlp_means = compute_template_means(model, toks, singletons, component="mlp_out")
    assert knockout_mlps(model, toks, metric, mlp_means, range(model.cfg.n_layers)).item() == pytest.approx(f_m, abs=ATOL)
    # ...whereas p_ABC means do change it
    abc = compute_template_means(model, new, groups)
    assert abs(evaluate_circuit(model, toks, metric, abc, circuit).item() - f_m) > 1e-3


def test_no_arena_mask_bug_positions_are_per_prompt():
    """Prompts with different relevant positions: each keeps only its own (not the union)."""
    model, toks, new, wi, metric, groups = setup()
    s2 = wi["S2"]
    assert len(set(s2.tolist())) > 1  # two templates -> two different S2 positions
    N, S = toks.shape
    keep = circuit_keep_mask({(1, 2): s2}, N, S, 3, 4)
    assert keep.sum().item() == N
    for i in range(N):
        assert keep[i, :, 1, 2].nonzero().flatten().tolist() == [int(s2[i])]
    means = compute_template_means(model, new, groups)
    circuit = {(1, 2): s2, (2, 0): [wi["END"], wi["S1+1"]], (0, 3): wi["IO"]}
    got = evaluate_circuit(model, toks, metric, means, circuit).item()
    manual = metric(model.run_with_hooks(toks, fwd_hooks=paper_style_circuit_hooks(model, means, circuit, N))).item()
    assert got == pytest.approx(manual, abs=ATOL)
    # The hooked z of a layer-0 head (unaffected by other ablations): prompt i keeps head 0.2 at its
    # own S2 only; at the other template's S2 it holds the mean (the ARENA bug keeps the real z).
    ablation = ablate_circuit(means, {(0, 2): s2})
    with model.hooks(fwd_hooks=ablation.hooks()):
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n == "blocks.0.attn.hook_z")
    z = cache["blocks.0.attn.hook_z"][:, :, 2]
    clean = z_cache(model, toks)[:, :, 0, 2]
    other = {int(p) for p in s2}
    for i in range(N):
        own = int(s2[i])
        assert torch.allclose(z[i, own], clean[i, own], atol=1e-5)
        for p in other - {own}:
            assert torch.allclose(z[i, p], means[i, p, 0, 2]) and not torch.allclose(z[i, p], clean[i, p])
    # Functionally (a metric reading every position): the buggy union mask gives another answer.
    def all_positions(logits):
        return logits[:, :, 262].mean()

    buggy = torch.zeros(N, S, 3, 4, dtype=torch.bool)
    for (l, h), positions in circuit.items():
        for pos in positions if isinstance(positions, list) else [positions]:
            buggy[:, pos, l, h] = True
    bug = all_positions(run_with_ablation(model, toks, Ablation(head_keep=buggy, head_means=means))).item()
    ours = evaluate_circuit(model, toks, all_positions, means, circuit).item()
    assert abs(bug - ours) > 1e-3


def test_circuit_knockout_modes():
    """F(C\\K) = F(C minus K); F(M\\K) = only K ablated, at their relevant positions."""
    model, toks, new, wi, metric, groups = setup(bos=True)
    means = compute_template_means(model, new, groups)
    circuit = {(0, 1): wi["S1+1"], (1, 2): wi["S2"], (2, 3): wi["END"], (2, 0): wi["END"]}
    K = [(1, 2), (2, 3)]
    rest = {h: p for h, p in circuit.items() if h not in K}
    f_ck = evaluate_circuit(model, toks, metric, means, circuit, knockout=K, knockout_mode="all_positions")
    assert f_ck.item() == pytest.approx(evaluate_circuit(model, toks, metric, means, rest).item(), abs=1e-6)
    f_mk = evaluate_circuit(model, toks, metric, means, circuit, knockout=K, knockout_mode="relevant_positions")
    direct = knockout_heads(model, toks, metric, means, {(1, 2): wi["S2"], (2, 3): wi["END"]})
    assert f_mk.item() == pytest.approx(direct.item(), abs=1e-6)
    abl = ablate_circuit(means, circuit, knockout=K, knockout_mode="relevant_positions")
    assert abl.n_ablated() == 2 * len(toks)  # two heads, one position per prompt
    pair = completeness_pair(model, toks, metric, means, circuit, K)
    assert pair[0].item() == pytest.approx(f_ck.item(), abs=1e-6)
    assert pair[1].item() == pytest.approx(f_mk.item(), abs=1e-6)
    f_m = metric(model(toks)).item()
    assert abs(f_mk.item() - f_m) > 1e-4 and abs(f_ck.item() - f_mk.item()) > 1e-3
    # K given with explicit positions; K outside the circuit needs them
    explicit = evaluate_circuit(model, toks, metric, means, None, knockout={(1, 2): wi["S2"], (2, 3): wi["END"]},
                                knockout_mode="relevant_positions")
    assert explicit.item() == pytest.approx(f_mk.item(), abs=1e-6)
    with pytest.raises(ValueError):
        evaluate_circuit(model, toks, metric, means, circuit, knockout=[(0, 0)], knockout_mode="relevant_positions")
    with pytest.raises(ValueError):
        evaluate_circuit(model, toks, metric, means, circuit, knockout=K, knockout_mode="some")
    with pytest.raises(ValueError):
        evaluate_circuit(model, toks, metric, means, {(3, 0): wi["END"]})
    with pytest.raises(ValueError):
        evaluate_circuit(model, toks[:3], metric, means, circuit)


def test_full_circuit_and_all_positions_keep():
    """Keeping every head at every position (positions=None) is F(M); an empty circuit ablates all."""
    model, toks, new, wi, metric, groups = setup()
    means = compute_template_means(model, new, groups)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    everything = {(l, h): None for l in range(L) for h in range(H)}
    f_m = metric(model(toks)).item()
    assert evaluate_circuit(model, toks, metric, means, everything).item() == pytest.approx(f_m, abs=1e-6)
    all_ablated = evaluate_circuit(model, toks, metric, means, {}).item()
    manual = metric(model.run_with_hooks(toks, fwd_hooks=paper_style_circuit_hooks(model, means, {}, len(toks)))).item()
    assert all_ablated == pytest.approx(manual, abs=ATOL)


def test_mlp_knockouts():
    model, toks, new, wi, metric, groups = setup(bos=True)
    mlp_means = compute_template_means(model, new, groups, component="mlp_out")
    L = model.cfg.n_layers
    sweep = mlp_knockout_sweep(model, toks, metric, mlp_means, progress=False)
    assert sweep.shape == (L,)
    for layer in range(L):
        def hook(act, hook, layer=layer):
            return mlp_means[:, :, layer]

        manual = metric(model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", hook)])).item()
        assert sweep[layer].item() == pytest.approx(manual, abs=ATOL)
    all_but_0 = knockout_mlps(model, toks, metric, mlp_means, range(1, L)).item()
    hooks = [(f"blocks.{l}.hook_mlp_out", lambda act, hook: mlp_means[:, :, hook.layer()]) for l in range(1, L)]
    assert all_but_0 == pytest.approx(metric(model.run_with_hooks(toks, fwd_hooks=hooks)).item(), abs=ATOL)
    at_end = mlp_knockout(mlp_means, [0], wi["END"])
    assert at_end.n_ablated() == len(toks)
    with pytest.raises(ValueError):
        mlp_knockout(mlp_means, [L])


def test_combined_ablation_and_circuit_positions():
    from ioi.circuits import circuit_from_mapping

    model, toks, new, wi, metric, groups = setup()
    means = compute_template_means(model, new, groups)
    mlp_means = compute_template_means(model, new, groups, component="mlp_out")
    both = head_knockout(means, {(2, 1): wi["END"]}).combine(mlp_knockout(mlp_means, [1]))
    hooks = head_knockout(means, {(2, 1): wi["END"]}).hooks() + mlp_knockout(mlp_means, [1]).hooks()
    assert metric(run_with_ablation(model, toks, both)).item() == pytest.approx(
        metric(model.run_with_hooks(toks, fwd_hooks=hooks)).item(), abs=ATOL)  # engine vs bridge hooks
    circ = circuit_from_mapping("toy", {"name mover": [(2, 1)], "induction": [(1, 0)], "previous token": [(0, 2)]})
    positions = circuit_positions(circ, wi)
    assert torch.equal(positions[(2, 1)], wi["END"]) and torch.equal(positions[(1, 0)], wi["S2"])
    assert torch.equal(positions[(0, 2)], wi["S1+1"])
    value = evaluate_circuit(model, toks, metric, means, positions)
    assert torch.isfinite(value)
