"""The edge_circuits experiment (ioi.experiments.edges) and its figures (ioi.plots.edges) end to
end on a tiny random GPT-2 (no ground truth: the paper-style head overlap only), with invariants
against independent recomputation: the circuits' faithfulness against keep-mode patching by the
bridge-hook reference, the frame's memberships against the summary. The planted model's branch
(ROC, AUC, ACDC's confusion against ioi.planted.circuit_edges) runs in the offline demo and is
checked claim by claim by tests/replication/test_planted_claims.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ioi.circuits import Circuit as HeadCircuit
from ioi.comparison import NOT_RUN, evaluate_claim, load_reference
from ioi.data import IOIDataset
from ioi.edges import Circuit, EdgeGraph, patch_edges_reference
from ioi.experiments.core import RunContext, run_and_write
from ioi.experiments.edges import edge_circuits
from ioi.metrics import LogitDiff
from ioi.models import load_model
from ioi.plots.common import save_figure
from ioi.registry import EXPERIMENTS, FIGURES, figures_of, resolve

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "random-L2-H2-D8"
TINY = HeadCircuit(name="tiny", classes={"name mover": ((1, 0),), "s-inhibition": ((0, 1),)})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = load_model(SPEC, device="cpu", seed=0)
    ioi = IOIDataset("mixed", N=6, seed=0)
    abc = ioi.abc_dataset(seed=0)
    ctx = RunContext(datasets={"ioi": ioi, "abc": abc}, circuit=TINY, n=6, progress=False)
    out = tmp_path_factory.mktemp("edges") / "edge_circuits"
    run_and_write(edge_circuits, model, ctx, out, experiment_name="edge_circuits")
    frame = pd.read_csv(out / "data.csv")
    summary = json.loads((out / "summary.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    return model, ioi, abc, out, frame, summary, meta


def test_registered_with_its_figures():
    assert EXPERIMENTS["edge_circuits"].n_key == "edges"
    assert {f.name for f in figures_of("edge_circuits")} == {
        "edges_roc", "edges_faithfulness", "edges_graph_acdc", "edges_graph_eap_ig"}


def test_result_files_and_summary(run):
    model, ioi, abc, out, frame, summary, meta = run
    graph = EdgeGraph.from_model(model)
    assert list(frame["edge"]) == graph.names
    assert summary["n_edges"] == len(graph) and summary["ground_truth"] is None
    assert "auc" not in summary and "truth" not in frame.columns  # no ground truth for this model
    assert summary["tau"] == pytest.approx(0.01 * abs(summary["clean_logit_diff"]))
    assert summary["n_top"] == max(1, round(0.01 * len(graph)))
    assert int(frame["acdc"].sum()) == summary["acdc_n_edges"] == len(summary["circuits"]["acdc"]["edges"])
    for name in ("eap_top_n", "eap_ig_top_n", "eap_threshold", "eap_ig_threshold"):
        assert int(frame[f"in_{name}"].sum()) == summary["circuits"][name]["n_edges"]
    # the top-n circuit is the n largest |scores|
    top = set(frame.loc[frame["eap_ig"].abs().sort_values(ascending=False, kind="stable").index[:summary["n_top"]], "edge"])
    assert top == set(summary["circuits"]["eap_ig_top_n"]["edges"])
    curve = summary["faithfulness_curves"]["eap"]
    assert curve["k"][0] == 0 and curve["k"][-1] == len(graph)
    assert curve["faithfulness"][0] == pytest.approx(0.0) and curve["faithfulness"][-1] == pytest.approx(1.0)
    assert meta["model"]["spec"] == SPEC and "stage_seconds" in meta


def test_circuit_faithfulness_matches_the_hook_reference(run):
    """Each circuit's LD in the summary equals the bridge-hook reference evaluation (keep mode)."""
    model, ioi, abc, out, frame, summary, meta = run
    graph = EdgeGraph.from_model(model)
    metric = LogitDiff.from_dataset(ioi)
    names = [n for n, c in summary["circuits"].items() if c["n_edges"]][:3]
    sets = [Circuit(edges=tuple(summary["circuits"][n]["edges"])) for n in names]
    reference = patch_edges_reference(model, ioi.toks, abc.toks, sets + [[]], metric, graph=graph,
                                      mode="keep").double().numpy()
    for name, value in zip(names, reference):
        assert summary["circuits"][name]["logit_diff"] == pytest.approx(value, abs=1e-4), name
    assert summary["corrupted_logit_diff"] == pytest.approx(reference[-1], abs=1e-4)


def test_gpt2_claims_read_the_summary(run, tmp_path):
    """The GPT-2 overlap claims find their keys (they evaluate, not NOT RUN) on any results folder."""
    out = run[3]
    claims = [c for c in load_reference("paper_reference.yaml")["claims"]
              if c["source"]["experiment"] == "edge_circuits"]
    assert len(claims) == 2
    for claim in claims:
        assert evaluate_claim(claim, out.parent).status != NOT_RUN, claim["id"]
        assert evaluate_claim(claim, tmp_path).status == NOT_RUN


@pytest.mark.parametrize("name", ["edges_roc", "edges_faithfulness", "edges_graph_acdc", "edges_graph_eap_ig"])
def test_figures_render(run, tmp_path, name):
    *_, frame, summary, meta = run
    fig = resolve(FIGURES[name].plotter)(frame, summary, meta)
    save_figure(fig, tmp_path / f"{name}.png", tmp_path / f"{name}.pdf")
    assert (tmp_path / f"{name}.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------
# config acdc: ACDC skipped on a CPU for GPT-2-sized graphs (hours), and everything downstream
# ------------------------------------------------------------------------------------------------


def test_acdc_decision_runs_on_gpu_or_small_graphs_and_says_why_not():
    from ioi.experiments.edges import ACDC_AUTO_CPU_MAX_EDGES, acdc_decision

    assert acdc_decision("auto", 479, "cpu")[0] and acdc_decision(None, ACDC_AUTO_CPU_MAX_EDGES, "cpu")[0]
    assert acdc_decision("auto", 32491, "cuda:0")[0]
    run_it, why = acdc_decision("auto", 32491, "cpu")
    assert not run_it and "32,491" in why and "acdc: true" in why
    assert acdc_decision(True, 32491, "cpu")[0] and acdc_decision("true", 32491, "cpu")[0]
    assert not acdc_decision(False, 479, "cpu")[0] and not acdc_decision("false", 479, "cuda")[0]
    with pytest.raises(ValueError, match="auto, true or false"):
        acdc_decision("yes", 10, "cpu")


@pytest.fixture(scope="module")
def planted_without_acdc(tmp_path_factory):
    from ioi.circuits import circuit_for_model

    model = load_model("planted-ioi", device="cpu", seed=0)
    ioi = IOIDataset("mixed", N=4, seed=0)
    abc = ioi.abc_dataset(seed=0)
    ctx = RunContext(datasets={"ioi": ioi, "abc": abc}, circuit=circuit_for_model("planted-ioi"), n=4,
                     progress=False, acdc=False)
    out = tmp_path_factory.mktemp("edges-no-acdc") / "edge_circuits"
    run_and_write(edge_circuits, model, ctx, out, experiment_name="edge_circuits")
    return (out, pd.read_csv(out / "data.csv"), json.loads((out / "summary.json").read_text()),
            json.loads((out / "meta.json").read_text()))


def test_skipped_acdc_leaves_no_number_and_its_claims_say_why(planted_without_acdc):
    out, frame, summary, meta = planted_without_acdc
    assert "acdc" not in summary["circuits"] and "acdc_n_edges" not in summary
    assert "acdc" not in summary["auc"] and summary["auc"]["eap_ig"] > 0  # the rankings still scored
    assert summary["acdc_status"].startswith("ACDC not run: config acdc: false")
    assert frame["acdc"].isna().all()
    claims = [c for c in load_reference("paper_reference.yaml")["claims"]
              if c["source"]["experiment"] == "edge_circuits" and c["source"]["key"].startswith("acdc")]
    assert claims
    for claim in claims:
        outcome = evaluate_claim(claim, out.parent)
        assert outcome.status == NOT_RUN and "config acdc: false" in outcome.reason


@pytest.mark.parametrize("name", ["edges_roc", "edges_faithfulness", "edges_graph_acdc"])
def test_figures_render_without_acdc(planted_without_acdc, tmp_path, name):
    import matplotlib.pyplot as plt

    out, frame, summary, meta = planted_without_acdc
    fig = resolve(FIGURES[name].plotter)(frame, summary, meta)
    texts = " ".join(t.get_text() for t in fig.findobj(plt.Text))
    assert "ACDC circuit (" not in texts  # no ACDC point or circuit drawn from missing data
    if name != "edges_faithfulness":
        assert "ACDC not run" in texts
    save_figure(fig, tmp_path / f"{name}.png", tmp_path / f"{name}.pdf")
