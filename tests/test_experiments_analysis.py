"""The logit-attribution and head-analysis experiments (ioi.experiments.attribution / .heads) and
their figures (ioi.plots.attribution / .heads), end to end on a tiny random GPT-2 with a small
hand-made circuit: result files, the summary keys paper_reference.yaml reads, finite values, exact
decompositions (DLA components sum to the model's LD), PNG + PDF figures, and the Snakemake DAG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml

from ioi.circuits import Circuit
from ioi.comparison import NOT_RUN, evaluate_claim, lookup
from ioi.data import IOIDataset
from ioi.experiments.core import RunContext, run_and_write
from ioi.models import load_model
from ioi.plots.common import save_figure
from ioi.registry import EXPERIMENTS, FIGURES, figures_of, resolve

ROOT = Path(__file__).resolve().parents[1]
SPEC = "random-L3-H4-D16"
N_LAYERS, N_HEADS = 3, 4
HEAD_KEYS = {f"{l}.{h}" for l in range(N_LAYERS) for h in range(N_HEADS)}

TINY_CIRCUIT = Circuit(
    name="tiny",
    classes={
        "name mover": ((2, 0), (2, 1)),
        "backup name mover": ((2, 2),),
        "negative name mover": ((2, 3),),
        "s-inhibition": ((1, 0), (1, 1)),
        "induction": ((1, 2),),
        "duplicate token": ((0, 1),),
        "previous token": ((0, 2), (0, 3)),
    },
)

OUR_EXPERIMENTS = ("logit_lens", "dla", "attn_patterns", "attention_summary", "fig3c", "fig16",
                   "copy_scores", "repeated_tokens")
OUR_FIGURES = ("logit_lens", "dla_layer", "dla_head", "attn_patterns", "attention_summary",
               "fig3c_attention_vs_projection", "fig16_backup_name_movers", "copy_scores",
               "fig18_head_scores", "fig17_next_token")

COLUMNS = {
    "logit_lens": {"prompt", "template", "component", "component_index", "logit_diff",
                   "logit_diff_own_ln", "model_logit_diff"},
    "dla": {"prompt", "template", "kind", "component", "layer", "head", "dla", "logit_diff"},
    "attn_patterns": {"rank", "layer", "head", "sign", "query", "key", "query_label", "key_label",
                      "attention"},
    "attention_summary": {"prompt", "template", "layer", "head", "class", "end_to_io", "end_to_s1",
                          "end_to_s2", "s2_to_s1", "s2_to_s1_plus_1"},
    "fig3c": {"layer", "head", "class", "prompt", "template", "name_kind", "attention", "projection"},
    "fig16": {"layer", "head", "class", "prompt", "template", "name_kind", "attention", "projection"},
    "copy_scores": {"layer", "head", "class", "copy_score", "negative_copy_score"},
    "repeated_tokens": {"sequence", "layer", "head", "class", "previous_token", "duplicate_token",
                        "induction", "next_token_contribution"},
}

# Per-head dicts ("layer.head" -> value) each summary must hold for every head of the model.
PER_HEAD_KEYS = {
    "dla": ("dla_head",),
    "attention_summary": ("end_to_io", "end_to_s1", "end_to_s2", "s2_to_s1", "s2_to_s1_plus_1"),
    "copy_scores": ("copy_score", "negative_copy_score"),
    "repeated_tokens": ("previous_token", "duplicate_token", "induction", "next_token_contribution"),
}

# The summary keys paper_reference.yaml reads from these experiments (also checked against the file).
CLAIM_KEYS = {
    "attention_summary": ("name_mover_attention_io_mean", "s_inhibition_attention_s2_mean"),
    "fig3c": ("correlation_min_over_name_movers", "correlation"),
    "copy_scores": ("copy_score", "negative_copy_score", "copy_score_mean_all_heads",
                    "negative_copy_score_mean_all_heads"),
    "repeated_tokens": ("previous_token", "duplicate_token", "induction", "next_token_contribution"),
}


@pytest.fixture(scope="module")
def model():
    return load_model(SPEC, device="cpu", seed=0)


@pytest.fixture(scope="module")
def datasets():
    ioi = IOIDataset(N=12, seed=0)
    return {"ioi": ioi, "abc": ioi.abc_dataset()}


def _context(datasets, names, circuit=TINY_CIRCUIT, n=12):
    chosen = {key: datasets[key] for key in names}
    return RunContext(datasets=chosen, circuit=circuit, seed=0, n=n if chosen else 2,
                      memory_budget_mb=64, progress=False)


@pytest.fixture(scope="module")
def results(model, datasets, tmp_path_factory):
    """Every experiment run once through run_and_write (as the workflow does): name -> folder."""
    root = tmp_path_factory.mktemp("results")
    folders = {}
    for name in OUR_EXPERIMENTS:
        spec = EXPERIMENTS[name]
        ctx = _context(datasets, spec.datasets)
        run_and_write(resolve(spec.runner), model, ctx, root / name, experiment_name=name)
        folders[name] = root / name
    return folders


def _read(folder: Path):
    return (pd.read_csv(folder / "data.csv"), json.loads((folder / "summary.json").read_text()),
            json.loads((folder / "meta.json").read_text()))


def _all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------


def test_registered():
    for name in OUR_EXPERIMENTS:
        assert name in EXPERIMENTS and callable(resolve(EXPERIMENTS[name].runner))
    assert EXPERIMENTS["repeated_tokens"].datasets == ()
    assert {EXPERIMENTS[n].n_key for n in ("logit_lens", "dla", "attn_patterns")} == {"patching"}
    assert {EXPERIMENTS[n].n_key for n in ("attention_summary", "fig3c", "fig16")} == {"scatter"}
    assert EXPERIMENTS["copy_scores"].n_key == "copy_score"
    for name in OUR_FIGURES:
        spec = FIGURES[name]
        assert spec.experiment in OUR_EXPERIMENTS and callable(resolve(spec.plotter))
        assert spec.caption and spec.category in ("Seed notebook", "Section 3", "Appendix")


def test_claim_keys_match_paper_reference():
    claims = yaml.safe_load((ROOT / "paper_reference.yaml").read_text())["claims"]
    named = {}
    for claim in claims:
        source = claim["source"]
        if source["experiment"] in CLAIM_KEYS:
            named.setdefault(source["experiment"], set()).add(source["key"])
    assert set(named) == set(CLAIM_KEYS)
    for experiment, keys in named.items():
        assert keys <= set(CLAIM_KEYS[experiment]), experiment


# ------------------------------------------------------------------------------------------------
# Result files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OUR_EXPERIMENTS)
def test_result_files(results, name):
    frame, summary, meta = _read(results[name])
    assert COLUMNS[name] <= set(frame.columns), set(frame.columns)
    assert len(frame) > 0
    numeric = frame.select_dtypes("number").drop(columns=["layer", "head"], errors="ignore")
    assert np.isfinite(numeric.to_numpy(float)).all()
    assert _all_finite(summary)
    assert meta["model"]["spec"] == SPEC and meta["experiment"] == name
    for key in PER_HEAD_KEYS.get(name, ()):
        assert set(summary[key]) == HEAD_KEYS, key
        assert all(isinstance(v, float) for v in summary[key].values()), key
    for key in CLAIM_KEYS.get(name, ()):
        value = lookup(summary, key, name)
        assert value is not None and _all_finite(value), key
    if name != "logit_lens":
        assert summary["n_layers"] == N_LAYERS and summary["n_heads"] == N_HEADS
        assert summary["circuit"]["classes"]["name mover"] == ["2.0", "2.1"]


def test_claims_read_our_results(results):
    """Every claim on these experiments evaluates (PASS/FAIL on a random model), never NOT RUN."""
    claims = yaml.safe_load((ROOT / "paper_reference.yaml").read_text())["claims"]
    root = next(iter(results.values())).parent
    ours = [c for c in claims if c["source"]["experiment"] in CLAIM_KEYS]
    assert ours
    for claim in ours:
        outcome = evaluate_claim(claim, root)
        assert outcome.status != NOT_RUN, (claim["id"], outcome.reason)


def test_dla_components_sum_to_logit_diff(results):
    frame, summary, _ = _read(results["dla"])
    layers = frame[frame["kind"] == "layer"]
    per_prompt = layers.groupby("prompt").agg(total=("dla", "sum"), ld=("logit_diff", "first"))
    np.testing.assert_allclose(per_prompt["total"], per_prompt["ld"], atol=1e-4, rtol=0)
    assert summary["dla_layer_sum_minus_logit_diff_max_abs"] < 1e-4
    assert summary["heads_plus_b_O_minus_attn_out_max_abs"] < 1e-4
    assert summary["dla_layer_labels"][:2] == ["embed", "pos_embed"]
    assert len(summary["dla_layer_labels"]) == 2 + 2 * N_LAYERS + 1
    heads = frame[frame["kind"] == "head"]
    assert len(heads) == 12 * N_LAYERS * N_HEADS
    means = heads.groupby(["layer", "head"])["dla"].mean()
    for (layer, head), value in means.items():
        assert summary["dla_head"][f"{int(layer)}.{int(head)}"] == pytest.approx(value, abs=1e-9)
    assert len(summary["top_positive_heads"]) == len(summary["top_negative_heads"]) == 5


def test_logit_lens_ends_at_the_model_logit_diff(results):
    frame, summary, _ = _read(results["logit_lens"])
    assert summary["labels"][0] == "0_pre" and summary["labels"][-1] == "final_post"
    final = frame[frame["component"] == "final_post"]
    np.testing.assert_allclose(final["logit_diff"], final["model_logit_diff"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(final["logit_diff_own_ln"], final["model_logit_diff"], atol=1e-4, rtol=0)
    assert summary["logit_diff_mean"][-1] == pytest.approx(summary["model_logit_diff_mean"], abs=1e-4)


def test_attn_patterns_one_template(results, datasets):
    frame, summary, meta = _read(results["attn_patterns"])
    ioi = datasets["ioi"]
    template = summary["template"]
    counts = pd.Series(ioi.template_ids).value_counts()
    assert counts[template] == counts.max()
    roles = summary["roles"]
    assert len(summary["token_labels"]) == roles["END"] + 1
    assert summary["token_labels"][roles["IO"]] == "[IO]"
    assert [h["sign"] for h in summary["heads"]] == ["positive"] * 3 + ["negative"] * 3
    dla = [h["dla"] for h in summary["heads"]]
    assert dla[:3] == sorted(dla[:3], reverse=True) and dla[3:] == sorted(dla[3:])
    rows = frame.groupby(["rank", "query"])["attention"].sum()  # each query row is a distribution
    np.testing.assert_allclose(rows.to_numpy(), 1.0, atol=1e-5)
    assert meta["template"] == template
    assert set(meta["prompts"]) == {i for i, t in enumerate(ioi.template_ids) if t == template}


def test_attention_summary_classes_and_cis(results):
    frame, summary, _ = _read(results["attention_summary"])
    nm = frame[frame["class"] == "name mover"].groupby("prompt")["end_to_io"].mean()
    assert summary["name_mover_attention_io_mean"] == pytest.approx(nm.mean(), abs=1e-9)
    for key in ("name_mover_attention_io_mean", "s_inhibition_attention_s2_mean"):
        low, high = summary[f"{key}_ci"]
        assert low <= summary[key] <= high
    assert 0 <= min(summary["end_to_io"].values()) and max(summary["end_to_io"].values()) <= 1


def test_scatter_correlations(results):
    _, summary, _ = _read(results["fig3c"])
    assert summary["heads"] == ["2.0", "2.1"]
    assert summary["correlation_min_over_name_movers"] == min(summary["correlation"].values())
    assert all(-1 <= r <= 1 for r in summary["correlation"].values())
    assert summary["plotted_head"] == "2.0"
    assert summary["correlation_plotted_head"] == summary["correlation"]["2.0"]
    _, summary16, _ = _read(results["fig16"])
    assert summary16["heads"] == ["2.2"] and summary16["head_class"] == "backup name mover"


def test_fig16_plots_the_papers_four_backup_name_movers():
    from ioi.circuits import PAPER_CIRCUIT
    from ioi.experiments import heads as eh

    heads, cls, note = eh.fig16_heads(PAPER_CIRCUIT)
    assert heads == [(10, 10), (10, 6), (10, 2), (11, 2)] and cls == "backup name mover"
    caption = FIGURES["fig16_backup_name_movers"].caption
    assert all(h in caption for h in ("10.10", "10.6", "10.2", "11.2")) and "10.10" in note


def test_fig16_without_backups_uses_negative_name_movers(model, datasets, tmp_path):
    classes = {k: v for k, v in TINY_CIRCUIT.classes.items() if k != "backup name mover"}
    ctx = _context(datasets, ("ioi",), circuit=Circuit("no-backups", classes))
    result = run_and_write(resolve(EXPERIMENTS["fig16"].runner), model, ctx, tmp_path / "fig16",
                           experiment_name="fig16")
    assert result.summary["heads"] == ["2.3"]
    assert result.summary["head_class"] == "negative name mover"
    fig = resolve(FIGURES["fig16_backup_name_movers"].plotter)(*_read(tmp_path / "fig16"))
    assert "NO backup name movers" in fig._suptitle.get_text()
    matplotlib.pyplot.close(fig)


def test_copy_scores_definition(results):
    frame, summary, meta = _read(results["copy_scores"])
    assert summary["value_biases_unfolded"] is True
    assert summary["n_samples"] == 3 * 12
    assert meta["definition"]["copy_score"]["variant"] == "paper"
    assert meta["definition"]["negative_copy_score"]["negative"] is True
    assert frame["copy_score"].between(0, 1).all() and frame["negative_copy_score"].between(0, 1).all()
    assert summary["copy_score_mean_all_heads"] == pytest.approx(frame["copy_score"].mean())


def test_repeated_tokens_without_datasets(results):
    frame, summary, _ = _read(results["repeated_tokens"])
    assert summary["n_sequences"] == 2 and summary["seq_len"] == 100 and summary["prepend_bos"] is False
    assert sorted(frame["sequence"].unique()) == [0, 1]
    for key in ("previous_token", "duplicate_token", "induction"):
        assert all(0 <= v <= 1 for v in summary[key].values())


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OUR_FIGURES)
def test_figure(results, tmp_path, name):
    spec = FIGURES[name]
    fig = resolve(spec.plotter)(*_read(results[spec.experiment]))
    assert isinstance(fig, matplotlib.figure.Figure)
    assert SPEC in fig._suptitle.get_text()  # the title names the model
    png, pdf = tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"
    save_figure(fig, png, pdf)
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"


def test_every_experiment_has_its_figures():
    for name in OUR_EXPERIMENTS:
        assert figures_of(name), name


# ------------------------------------------------------------------------------------------------
# Workflow
# ------------------------------------------------------------------------------------------------


def test_snakemake_dry_run_lists_the_figures(tiny_dry_run):
    listed = tiny_dry_run
    for name in OUR_FIGURES:
        for ext in ("png", "pdf"):
            assert f"figures/random-tiny/{name}.{ext}" in listed, name
