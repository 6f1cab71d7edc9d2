"""The path-patching figure experiments (ioi.experiments.path_figures) and their figures
(ioi.plots.path_figures), end to end on a tiny random GPT-2 with a hand-made circuit: result files,
the summary keys paper_reference.yaml reads, the % change definition, Fig. 4c's multi-sender
patching against a slow per-prompt alternative (paper-code freezing of q/k/v, hand-computed
queries), Fig. 15 with nothing knocked out equal to Fig. 3b, the knockouts against
ioi.ablation, PNG + PDF figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ioi.ablation import compute_template_means, knockout_heads, knockout_mlps
from ioi.circuits import Circuit
from ioi.comparison import NOT_RUN, evaluate_claim, lookup
from ioi.data import IOIDataset
from ioi.experiments import path_figures as pf
from ioi.experiments.core import RunContext, run_and_write
from ioi.metrics import LogitDiff
from ioi.models import load_model
from ioi.patching.path import path_patch_to_heads, path_patch_to_logits
from ioi.plots.common import save_figure
from ioi.registry import EXPERIMENTS, FIGURES, figures_of, resolve

ROOT = Path(__file__).resolve().parents[1]
SPEC = "random-L4-H2-D8"
N_LAYERS, N_HEADS, N = 4, 2, 10
HEAD_KEYS = {f"{l}.{h}" for l in range(N_LAYERS) for h in range(N_HEADS)}

TINY_CIRCUIT = Circuit(
    name="tiny",
    classes={
        "name mover": ((3, 0),),
        "backup name mover": ((3, 1),),
        "negative name mover": ((2, 1),),
        "s-inhibition": ((2, 0),),
        "induction": ((1, 0),),
        "duplicate token": ((0, 1),),
        "previous token": ((0, 0),),
    },
)

OUR_EXPERIMENTS = ("fig3b", "fig4b", "fig4c", "fig5b", "fig12b", "fig13b", "fig15", "fig19",
                   "induction_queries", "sinh_queries")
OUR_FIGURES = {
    "fig3b_path_patching_logits": "fig3b",
    "fig4b_path_patching_nm_queries": "fig4b",
    "fig4c_nm_attention": "fig4c",
    "fig5b_path_patching_sinh_values": "fig5b",
    "fig12b_path_patching_sinh_keys": "fig12b",
    "fig13b_path_patching_induction_keys": "fig13b",
    "fig15_backup_name_movers": "fig15",
    "fig19_mlps": "fig19",
    "induction_queries": "induction_queries",
    "sinh_queries": "sinh_queries",
}
HEAD_COLUMNS = {"layer", "head", "class", "variant", "value", "ci_low", "ci_high"}
COLUMNS = {
    "fig3b": HEAD_COLUMNS,
    "fig4b": HEAD_COLUMNS | {"receiver"},
    "fig5b": HEAD_COLUMNS | {"receiver"},
    "fig12b": HEAD_COLUMNS | {"receiver"},
    "fig13b": HEAD_COLUMNS | {"receiver"},
    "induction_queries": HEAD_COLUMNS | {"receiver"},
    "sinh_queries": HEAD_COLUMNS | {"receiver"},
    "fig15": HEAD_COLUMNS,
    "fig4c": {"prompt", "template", "layer", "head", "condition", "key", "attention", "logit_diff"},
    "fig19": {"layer", "variant", "value", "ci_low", "ci_high", "unit"},
}
# Summary keys paper_reference.yaml reads (checked against the file below) and the plotters need.
CLAIM_KEYS = {
    "fig3b": ("effect",),
    "fig4b": ("effect",),
    "fig5b": ("effect", "max_abs_effect"),
    "fig12b": ("effect",),
    "fig13b": ("effect", "max_abs_effect"),
    "fig4c": ("attention_s1_after", "attention_io_after", "attention_s1_before", "attention_io_before"),
    "induction_queries": ("effect", "max_abs_effect"),
    "sinh_queries": ("effect", "max_abs_effect"),
    "fig15": ("knockout_logit_diff_ratio", "effect_after", "backup_candidates", "backup_selected"),
    "fig19": ("mlp0_knockout_logit_diff", "all_but_mlp0_knockout_logit_diff"),
}
PER_HEAD_KEYS = {
    "fig3b": ("effect", "effect_all_positions"),
    "fig4b": ("effect",),
    "fig5b": ("effect",),
    "fig12b": ("effect",),
    "fig13b": ("effect",),
    "induction_queries": ("effect",),
    "sinh_queries": ("effect",),
    "fig15": ("effect_before", "effect_after"),
}
# Senders that cannot reach the receivers (layer >= the last receiver layer) -> None.
UNREACHABLE = {"fig4b": 3, "fig5b": 2, "fig12b": 2, "fig13b": 1, "induction_queries": 1, "sinh_queries": 2}


@pytest.fixture(scope="module")
def model():
    return load_model(SPEC, device="cpu", seed=0)


@pytest.fixture(scope="module")
def ctx():
    ioi = IOIDataset(N=N, seed=0)
    return RunContext(datasets={"ioi": ioi, "abc": ioi.abc_dataset()}, circuit=TINY_CIRCUIT, seed=0,
                      n=N, memory_budget_mb=64, progress=False)


@pytest.fixture(scope="module")
def results(model, ctx, tmp_path_factory):
    """Every experiment run once through run_and_write (as the workflow does): name -> folder."""
    root = tmp_path_factory.mktemp("results")
    for name in OUR_EXPERIMENTS:
        run_and_write(resolve(EXPERIMENTS[name].runner), model, ctx, root / name, experiment_name=name)
    return {name: root / name for name in OUR_EXPERIMENTS}


def _read(folder: Path):
    return (pd.read_csv(folder / "data.csv"), json.loads((folder / "summary.json").read_text()),
            json.loads((folder / "meta.json").read_text()))


def _toks(ctx):
    return ctx.ioi.toks, ctx.abc.toks


# ------------------------------------------------------------------------------------------------
# Registry and claims
# ------------------------------------------------------------------------------------------------


def test_registered():
    for name in OUR_EXPERIMENTS:
        spec = EXPERIMENTS[name]
        assert callable(resolve(spec.runner)) and spec.datasets == ("ioi", "abc")
        assert spec.n_key == ("knockout" if name in ("fig15", "fig19") else "patching")
        assert spec.section and spec.description
    for figure_name, experiment_name in OUR_FIGURES.items():
        spec = FIGURES[figure_name]
        assert spec.experiment == experiment_name and callable(resolve(spec.plotter))
        assert spec.caption and spec.category in ("Section 3", "Appendix")
    for name in OUR_EXPERIMENTS:
        assert figures_of(name), name


def test_claim_keys_match_paper_reference():
    claims = yaml.safe_load((ROOT / "paper_reference.yaml").read_text())["claims"]
    named: dict[str, set] = {}
    for claim in claims:
        source = claim["source"]
        if source["experiment"] in OUR_EXPERIMENTS:
            named.setdefault(source["experiment"], set()).add(source["key"])
    for experiment, keys in named.items():
        assert keys <= set(CLAIM_KEYS[experiment]), experiment


def test_claims_read_our_results(results):
    claims = yaml.safe_load((ROOT / "paper_reference.yaml").read_text())["claims"]
    root = next(iter(results.values())).parent
    ours = [c for c in claims if c["source"]["experiment"] in OUR_EXPERIMENTS]
    assert ours
    for claim in ours:
        outcome = evaluate_claim(claim, root)
        assert outcome.status != NOT_RUN, (claim["id"], outcome.reason)


# ------------------------------------------------------------------------------------------------
# Result files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OUR_EXPERIMENTS)
def test_result_files(results, name):
    frame, summary, meta = _read(results[name])
    assert COLUMNS[name] <= set(frame.columns), set(frame.columns)
    assert len(frame) > 0
    assert meta["model"]["spec"] == SPEC and meta["experiment"] == name and meta["N"] == N
    assert summary["n_layers"] == N_LAYERS and summary["n_heads"] == N_HEADS
    assert summary["circuit"]["classes"]["name mover"] == ["3.0"]
    for key in CLAIM_KEYS.get(name, ()):
        assert lookup(summary, key, name) is not None, key
    for key in PER_HEAD_KEYS.get(name, ()):
        values = summary[key]
        assert set(values) == HEAD_KEYS, key
        unreachable = {k for k in HEAD_KEYS if int(k.split(".")[0]) >= UNREACHABLE.get(name, N_LAYERS)}
        assert {k for k, v in values.items() if v is None} == unreachable, key
        assert all(math.isfinite(v) for v in values.values() if v is not None)
        rows = frame[frame["variant"] == frame["variant"].iloc[0]] if name != "fig3b" else frame[frame["variant"] == "end"]
        if key in ("effect", "effect_before"):
            for _, row in rows.iterrows():
                value = values[f"{int(row['layer'])}.{int(row['head'])}"]
                assert (value is None and np.isnan(row["value"])) or row["value"] == pytest.approx(value)
                if value is not None:
                    assert row["ci_low"] <= value + 1e-9 and value - 1e-9 <= row["ci_high"]


def test_receivers_and_positions(results):
    expected = {"fig4b": (["3.0"], "q", "END"), "fig5b": (["2.0"], "v", "S2"),
                "fig12b": (["2.0"], "k", "S2"), "fig13b": (["1.0"], "k", "S1+1"),
                "induction_queries": (["1.0"], "q", "S2"), "sinh_queries": (["2.0"], "q", "END")}
    for name, (receivers, which, position) in expected.items():
        frame, summary, _ = _read(results[name])
        assert summary["receivers"] == receivers and summary["receiver_input"] == which
        assert summary["sender_position"] == summary["receiver_position"] == position
        marked = frame[frame["receiver"]]
        assert {f"{l}.{h}" for l, h in zip(marked["layer"], marked["head"])} == set(receivers)


def test_fig13b_receivers_are_the_papers_induction_heads():
    """App. D: the receivers are the keys of 5.5 and 6.9 (not the fuzzy 5.8, 5.9) by default."""
    from ioi.circuits import PAPER_CIRCUIT

    assert pf.fig13b_receivers(PAPER_CIRCUIT) == [(5, 5), (6, 9)]
    assert set(pf.fig13b_receivers(PAPER_CIRCUIT, "all_induction")) == {(5, 5), (5, 8), (5, 9), (6, 9)}
    assert pf.fig13b_receivers(TINY_CIRCUIT) == [(1, 0)]  # no fuzzy heads outside the paper circuit
    with pytest.raises(ValueError, match="all_induction"):
        pf.fig13b_receivers(PAPER_CIRCUIT, "fuzzy")


def test_fig13b_explicit_receivers(model, ctx):
    summary = pf.fig13b(model, ctx, receivers=[(1, 1)]).summary
    assert summary["receivers"] == ["1.1"] and summary["receiver_choice"] == "explicit"


def test_fig3b_is_the_percent_change_of_the_mean(model, ctx, results):
    """Mean of the paired per-prompt values == LogitDiff(normalisation='percent_change')."""
    _, summary, _ = _read(results["fig3b"])
    orig, new = _toks(ctx)
    clean = summary["clean_logit_diff"]
    metric = LogitDiff.from_dataset(ctx.ioi, normalisation="percent_change", clean=clean)
    for key, positions in (("effect", ctx.ioi.word_idx["END"]), ("effect_all_positions", None)):
        direct = path_patch_to_logits(model, orig, new, metric, sender_positions=positions, progress=False)
        ours = np.array([[summary[key][f"{l}.{h}"] for h in range(N_HEADS)] for l in range(N_LAYERS)])
        np.testing.assert_allclose(ours, direct.numpy(), rtol=1e-3, atol=1e-3)
    # With every other head frozen, only the sender's change at END reaches the END logits.
    assert summary["all_positions_max_abs_difference"] < 1e-3


# ------------------------------------------------------------------------------------------------
# Fig. 4c: several senders at once, against a slow alternative
# ------------------------------------------------------------------------------------------------


def _slow_senders_to_queries(model, orig, new, senders, receivers, end, io, s):
    """Per prompt, paper-code style: every head's q, k, v frozen to x_orig, the senders' z from
    x_new at END; receivers' queries computed by hand from ln1's output; then a clean run with
    those queries at END. Returns pattern rows {head: [N, seq]} before / after and LD after."""
    L = model.cfg.n_layers
    _, oc = model.run_with_cache(orig)
    _, nc = model.run_with_cache(new)
    before = {h: [] for h in receivers}
    after = {h: [] for h in receivers}
    ld_after = []
    for i in range(orig.shape[0]):
        e = int(end[i])

        def freeze(act, hook, i=i):
            return oc[hook.name][i : i + 1].clone()

        def sender_z(z, hook, i=i, e=e):
            z = z.clone()
            for layer, head in senders:
                if layer == hook.layer():
                    z[0, e, head] = nc[hook.name][i, e, head]
            return z

        normed = {}

        def record(act, hook):
            normed[hook.layer()] = act.clone()

        hooks = [(f"blocks.{l}.attn.hook_{x}", freeze) for l in range(L) for x in "qkv"]
        hooks += [(f"blocks.{l}.attn.hook_z", sender_z) for l in range(L)]
        hooks += [(f"blocks.{l}.ln1.hook_out", record) for l in {l for l, _ in receivers}]
        model.run_with_hooks(orig[i : i + 1], fwd_hooks=hooks)
        q_new = {(l, h): normed[l][0, e] @ model.W_Q[l, h] + model.b_Q[l, h] for l, h in receivers}

        def patch_q(q, hook, e=e):
            q = q.clone()
            for (layer, head), value in q_new.items():
                if layer == hook.layer():
                    q[0, e, head] = value
            return q

        patterns = {}

        def keep(act, hook):
            patterns[hook.layer()] = act.clone()

        layers = {l for l, _ in receivers}
        logits = model.run_with_hooks(
            orig[i : i + 1],
            fwd_hooks=[(f"blocks.{l}.attn.hook_q", patch_q) for l in layers]
            + [(f"blocks.{l}.attn.hook_pattern", keep) for l in layers],
        )
        for layer, head in receivers:
            before[(layer, head)].append(oc[f"blocks.{layer}.attn.hook_pattern"][i, head, e])
            after[(layer, head)].append(patterns[layer][0, head, e])
        ld_after.append(float(logits[0, e, io[i]] - logits[0, e, s[i]]))
    stack = lambda d: {k: torch.stack(v) for k, v in d.items()}  # noqa: E731
    return stack(before), stack(after), np.array(ld_after)


def test_fig4c_matches_slow_alternative(model, ctx):
    rows = slice(0, 4)  # the slow loop is per prompt: a few prompts of different templates
    orig, new = (t[rows] for t in _toks(ctx))
    d = ctx.ioi
    end, io, s = d.word_idx["END"][rows], d.io_token_ids[rows], d.s_token_ids[rows]
    assert len(set(end.tolist())) > 1
    senders, receivers = [(1, 0), (2, 0)], [(2, 1), (3, 0), (3, 1)]
    fast = pf.patch_senders_to_receiver_inputs(
        model, orig, new, senders, receivers, receiver_input="q", sender_positions=end,
        receiver_positions=end, query_positions=end, answer_ids=(io, s),
        memory_budget_mb=1,  # forces chunks of a few prompts
    )
    before, after, ld_after = _slow_senders_to_queries(model, orig, new, senders, receivers, end, io, s)
    changed = 0.0
    for head in receivers:
        torch.testing.assert_close(fast["before"][head], before[head], atol=1e-5, rtol=0)
        torch.testing.assert_close(fast["after"][head], after[head], atol=1e-5, rtol=0)
        changed = max(changed, float((after[head] - before[head]).abs().max()))
    assert changed > 1e-6  # the patch does something
    np.testing.assert_allclose(fast["logit_diff_after"].numpy(), ld_after, atol=1e-5, rtol=0)


def test_fig4c_single_sender_matches_path_patch_to_heads(model, ctx):
    rows = slice(0, 5)
    orig, new = (t[rows] for t in _toks(ctx))
    d = ctx.ioi[rows]
    end = d.word_idx["END"]
    receivers = [(3, 0)]
    metric = LogitDiff.from_dataset(d)
    sweep = path_patch_to_heads(model, orig, new, metric, receivers, "q", sender_positions=end,
                                receiver_positions=end, progress=False)
    for sender in [(1, 1), (2, 0)]:
        res = pf.patch_senders_to_receiver_inputs(
            model, orig, new, [sender], receivers, sender_positions=end, receiver_positions=end,
            query_positions=end, answer_ids=(d.io_token_ids, d.s_token_ids))
        assert float(res["logit_diff_after"].mean()) == pytest.approx(float(sweep[sender]), abs=1e-5)
    empty = pf.patch_senders_to_receiver_inputs(model, orig, new, [], receivers, sender_positions=end,
                                                receiver_positions=end, query_positions=end)
    torch.testing.assert_close(empty["after"][(3, 0)], empty["before"][(3, 0)], atol=1e-6, rtol=0)


def test_fig4c_summary(results):
    frame, summary, _ = _read(results["fig4c"])
    for condition in ("before", "after"):
        total = sum(summary[f"attention_{condition}"][k] for k in summary["key_positions"])
        assert total == pytest.approx(1.0, abs=1e-5)
        assert summary[f"attention_io_{condition}"] == summary[f"attention_{condition}"]["IO"]
        assert summary[f"attention_s1_{condition}"] == summary[f"attention_{condition}"]["S1"]
        assert all(v >= 0 for v in summary[f"attention_{condition}_std"].values())
    assert summary["senders"] == ["2.0"] and summary["receivers"] == ["3.0"]
    io_before = frame[(frame["condition"] == "before") & (frame["key"] == "IO")]["attention"].mean()
    assert summary["attention_io_before"] == pytest.approx(io_before)


# ------------------------------------------------------------------------------------------------
# Fig. 15, Fig. 19: knockouts
# ------------------------------------------------------------------------------------------------


def test_fig15_empty_knockout_equals_fig3b(model, ctx, results):
    _, fig3b, _ = _read(results["fig3b"])
    empty = pf.backup_name_movers(model, ctx, knocked_out=[]).summary
    assert empty["knockout_logit_diff_ratio"] == pytest.approx(1.0)
    for key in HEAD_KEYS:
        assert empty["effect_after"][key] == pytest.approx(fig3b["effect"][key], abs=1e-6)
        assert empty["effect_before"][key] == pytest.approx(fig3b["effect"][key], abs=1e-6)


def test_fig15_knockout_matches_ablation_module(model, ctx, results):
    _, summary, _ = _read(results["fig15"])
    orig, new = _toks(ctx)
    d = ctx.ioi
    means = compute_template_means(model, new, d.groups)
    ko = knockout_heads(model, orig, LogitDiff.from_dataset(d), means, {(3, 0): d.word_idx["END"]})
    assert summary["knockout_logit_diff"] == pytest.approx(float(ko), abs=1e-5)
    assert summary["knockout_logit_diff_ratio"] == pytest.approx(float(ko) / summary["clean_logit_diff"], rel=1e-4)
    low, high = summary["knockout_logit_diff_ratio_ci"]
    assert low <= summary["knockout_logit_diff_ratio"] <= high
    assert summary["knocked_out"] == ["3.0"]
    # Every class but the backup name movers (3.1) is excluded.
    excluded = {"0.0", "0.1", "1.0", "2.0", "2.1", "3.0"}
    candidates = summary["backup_candidates"]
    assert not set(candidates) & excluded
    after = [abs(summary["effect_after"][k]) for k in candidates]
    assert after == sorted(after, reverse=True) and all(a > 2.0 for a in after)
    assert summary["backup_selected"] == candidates[:8]
    # Knocked out in every run (x_new too), so patching it changes nothing (% of a tiny random LD).
    assert summary["effect_after"]["3.0"] == pytest.approx(0.0, abs=1e-3)


def test_backup_name_movers_follow_the_papers_rule():
    """App. F: heads in no other class, effect size above 2%, ordered by |effect| (either sign);
    not the most negative effects."""
    effect = np.zeros((N_LAYERS, N_HEADS))
    effect[3, 1] = 9.0    # the circuit's backup: kept (positive effects count too)
    effect[1, 1] = -5.0   # outside the circuit: kept
    effect[0, 0] = -50.0  # previous token head: another class, excluded
    effect[2, 0] = -40.0  # s-inhibition: excluded
    effect[3, 0] = np.nan  # knocked out / unreachable
    effect[1, 0] = 1.5    # induction (excluded anyway) below the threshold
    picked = pf.backup_name_mover_selection(effect, TINY_CIRCUIT)
    assert picked["backup_candidates"] == ["3.1", "1.1"]
    assert picked["backup_selected"] == ["3.1", "1.1"]
    effect[1, 1] = -1.9   # below 2%: dropped
    assert pf.backup_name_mover_selection(effect, TINY_CIRCUIT)["backup_candidates"] == ["3.1"]


def test_fig19_matches_ablation_module(model, ctx, results):
    frame, summary, _ = _read(results["fig19"])
    orig, new = _toks(ctx)
    d = ctx.ioi
    mlp_means = compute_template_means(model, new, d.groups, component="mlp_out")
    metric = LogitDiff.from_dataset(d)
    assert summary["mlp0_knockout_logit_diff"] == pytest.approx(
        float(knockout_mlps(model, orig, metric, mlp_means, [0])), abs=1e-5)
    assert summary["all_but_mlp0_knockout_logit_diff"] == pytest.approx(
        float(knockout_mlps(model, orig, metric, mlp_means, range(1, N_LAYERS))), abs=1e-5)
    assert len(summary["mlp_knockout_logit_diff"]) == len(summary["mlp_path_patching_effect"]) == N_LAYERS
    assert set(frame["variant"]) == {"knockout", "knockout_percent_change", "path_patching",
                                     "knockout_all_but_mlp0", "clean"}


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OUR_FIGURES))
def test_figure(results, tmp_path, name):
    spec = FIGURES[name]
    fig = resolve(spec.plotter)(*_read(results[spec.experiment]))
    assert isinstance(fig, matplotlib.figure.Figure)
    assert SPEC in fig._suptitle.get_text()  # the title names the model
    png, pdf = tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"
    save_figure(fig, png, pdf)
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"


def test_head_stats_equal_per_head_bootstrap_ci():
    """The vectorised per-head CIs are ioi.experiments.attribution.ci's, bit for bit (NaN rows kept)."""
    from ioi.experiments.attribution import ci

    rng = np.random.default_rng(3)
    values = rng.normal(size=(3, 4, 9)) * rng.uniform(0.1, 30, size=(3, 4, 1))
    values[2] = np.nan
    mean, low, high = pf._head_stats(values, seed=5)
    assert np.isnan(mean[2]).all() and np.isnan(low[2]).all()
    for layer in range(2):
        for head in range(4):
            assert mean[layer, head] == values[layer, head].mean()
            assert [low[layer, head], high[layer, head]] == ci(values[layer, head], 5)


@pytest.mark.parametrize("spec,bos", [("random-L3-H4-D16", True), ("random-L4-H2-D8", False), ("planted-ioi", False)])
def test_fig4c_plain_tensor_equals_hooked(spec, bos):
    """patch_senders_to_receiver_inputs (plain-tensor forward) == its hooked twin on the bridge:
    padded batches, BOS on/off, receivers in two layers, a pattern head outside the receivers."""
    from ioi_batches import make_batch, sharp_model

    model = load_model(spec, device="cpu") if spec == "planted-ioi" else sharp_model(spec)
    toks, new, wi, io, s, _ = make_batch(5, bos)
    L = model.cfg.n_layers
    senders, receivers = [(0, 1), (1, 0)], [(L - 1, 1), (L - 2, 0)]
    if spec == "planted-ioi":
        senders, receivers = [(2, 0), (1, 2)], [(3, 1), (3, 0)]
    kw = dict(receiver_input="q", sender_positions=None if bos else wi["END"], receiver_positions=wi["END"],
              query_positions=wi["END"], answer_ids=(io, s), pattern_heads=receivers + [(L - 1, 0)],
              memory_budget_mb=256 if spec == "planted-ioi" else 1)  # 1 MB: chunks of a few prompts
    fast = pf.patch_senders_to_receiver_inputs(model, toks, new, senders, receivers, **kw)
    hooked = pf.patch_senders_to_receiver_inputs_hooked(model, toks, new, senders, receivers, **kw)
    changed = 0.0
    for when in ("before", "after"):
        for head, rows in hooked[when].items():
            torch.testing.assert_close(fast[when][head], rows, atol=1e-5, rtol=0)
            changed = max(changed, float((hooked["after"][head] - hooked["before"][head]).abs().max()))
    for key in ("logit_diff_before", "logit_diff_after"):
        torch.testing.assert_close(fast[key], hooked[key], atol=1e-4, rtol=0)
    assert changed > 1e-3
    assert float((hooked["logit_diff_after"] - hooked["logit_diff_before"]).abs().max()) > 1e-3
