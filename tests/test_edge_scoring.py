"""ioi.edges.scoring: ROC / AUC / precision against hand-computable rankings and a brute-force
pairwise count, MIB's faithfulness area, head overlap with the paper's circuit, and the
faithfulness curve on the planted model against direct keep-mode patching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ioi.circuits import PAPER_CIRCUIT
from ioi.edges import Circuit, Edge, EdgeGraph
from ioi.edges.scoring import (
    edge_counts,
    head_overlap,
    normalised_area,
    precision_at_k,
    roc_auc,
    roc_curve,
    truth_labels,
)


def brute_force_auc(scores, labels) -> float:
    """Every (true, other) pair: 1 if the true edge scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_perfect_inverted_and_hand_computed_rankings():
    labels = [True, True, False, False]
    assert roc_auc([4, 3, 2, 1], labels) == 1.0
    assert roc_auc([1, 2, 3, 4], labels) == 0.0
    # by |score| = [5, .1, 3, .2]: 5 beats 3 and .2, .1 beats neither -> 2 of 4 pairs
    assert roc_auc([-5, 0.1, 3, 0.2], labels) == 0.5
    # by the signed score -5 and .1 beat neither 3 nor .2
    assert roc_auc([-5, 0.1, 3, 0.2], labels, absolute=False) == 0.0


def test_auc_ties_count_half():
    assert roc_auc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert roc_auc([2, 1, 1, 0], [True, True, False, False]) == 0.875  # (1 + 1 + 0.5 + 1) / 4


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_brute_force_pairwise_count_and_roc_area(seed):
    rng = np.random.default_rng(seed)
    n = 40
    scores = rng.integers(-4, 5, n).astype(float)  # many ties
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    expected = brute_force_auc(np.abs(scores), labels)
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    curve = roc_curve(scores, labels)
    assert curve.auc == pytest.approx(expected, abs=1e-12)
    assert curve.fpr[0] == 0 and curve.tpr[0] == 0 and curve.fpr[-1] == 1 and curve.tpr[-1] == 1
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected, abs=1e-12)


def test_roc_points_by_hand():
    curve = roc_curve([0.9, 0.8, 0.8, 0.1], [True, False, True, False])
    np.testing.assert_allclose(curve.tpr, [0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(curve.fpr, [0, 0.0, 0.5, 1.0])
    assert curve.auc == pytest.approx(0.875)


def test_precision_at_k():
    labels = [True, False, True, False, False]
    assert precision_at_k([5, 4, 3, 2, 1], labels) == 0.5  # k = 2 true edges: {T, F}
    assert precision_at_k([5, 1, 4, 2, 3], labels) == 1.0
    assert precision_at_k([5, 4, 3, 2, 1], labels, k=3) == pytest.approx(2 / 3)
    # the 2nd place is shared by three tied edges, one of them true: 1 + 1/3 hits of 2
    assert precision_at_k([5, 1, 1, 1, 0], [True, True, False, False, False]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k = 0"):
        precision_at_k([1, 2], [True, False], k=0)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 2, 3], [True, True, True])
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc([1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        roc_auc([1, 2, 3], [True, False])
    graph = EdgeGraph.from_model(n_layers=2, n_heads=2)
    with pytest.raises(ValueError, match="not edges of this graph"):
        truth_labels(graph, ["embed->a0.h0.q@END"])


def test_truth_labels_mark_exactly_the_truth():
    graph = EdgeGraph.from_model(n_layers=2, n_heads=2)
    truth = [Edge.parse("embed->a0.h1.v"), "a0.h0->logits"]
    labels = truth_labels(graph, truth)
    assert int(labels.sum()) == 2
    assert labels[graph.index("a0.h0->logits")] and labels[graph.index("embed->a0.h1.v")]


def test_mib_area_by_hand():
    area = normalised_area([0.001, 0.5, 1.0], [0.0, 1.0, 1.0])
    assert area["cpr"] == pytest.approx(0.499 * 0.5 + 0.5)
    assert area["cmd"] == pytest.approx(0.499 * 0.5)
    perfect = normalised_area([0.001, 0.01, 1.0], [1.0, 1.0, 1.0])
    assert perfect["cpr_mean"] == pytest.approx(1.0) and perfect["cmd"] == 0.0
    # points below 0.1% are left out, as MIB's grid starts there
    assert normalised_area([0.0, 0.001, 1.0], [5.0, 1.0, 1.0])["cpr_mean"] == pytest.approx(1.0)
    log = normalised_area([0.001, 0.01, 0.1], [0.0, 1.0, 1.0], log_scale=True)
    assert log["cpr_mean"] == pytest.approx(0.75)


def test_edge_counts_follow_mib_rounding():
    assert edge_counts(479) == [0, 2, 4, 9, 23, 47, 95, 239, 479]
    assert edge_counts(479, extra=[19]) == [0, 2, 4, 9, 19, 23, 47, 95, 239, 479]


def test_head_overlap_with_the_paper_circuit():
    circuit = Circuit(edges=(Edge.parse("a9.h9->logits"), Edge.parse("embed->a9.h9.q"),
                             Edge.parse("a0.h5->a9.h9.k"), Edge.parse("a7.h3->a9.h6.q")))
    overlap = head_overlap(circuit)
    assert overlap["found_heads"] == ["0.5", "7.3", "9.6", "9.9"]
    assert overlap["shared_heads"] == ["7.3", "9.6", "9.9"]
    assert overlap["extra_heads"] == ["0.5"]
    assert overlap["precision"] == pytest.approx(3 / 4)
    assert overlap["recall"] == pytest.approx(3 / 26)
    assert overlap["by_class"]["name mover"]["found"] == ["9.9", "9.6"]
    assert overlap["by_class"]["s-inhibition"]["recall"] == pytest.approx(1 / 4)
    assert overlap["n_reference"] == len(PAPER_CIRCUIT.heads()) == 26
    assert head_overlap(["a9.h9", (10, 0), "3.0"])["shared_heads"] == ["3.0", "9.9", "10.0"]


@pytest.mark.usefixtures("one_thread")
def test_faithfulness_curve_on_the_planted_model_against_the_hook_reference():
    """The truth ranked first: f(0) = 0, f(19 planted edges) ~ 1, f(all) = 1; each point equals
    the bridge-hook reference evaluation of the same top-k circuit (keep mode)."""
    from ioi import planted
    from ioi.data import IOIDataset
    from ioi.edges import patch_edges_reference
    from ioi.edges.scoring import faithfulness_curve, top_k_order
    from ioi.metrics import LogitDiff
    from ioi.models import load_model

    model = load_model("planted-ioi", device="cpu")
    ioi = IOIDataset("mixed", N=6, seed=1)
    abc = ioi.abc_dataset(seed=1)
    metric = LogitDiff.from_dataset(ioi)
    graph = EdgeGraph.from_model(model)
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.uniform(0, 0.5, len(graph)))
    scores[truth_labels(graph, planted.circuit_edges())] += 1.0
    curve = faithfulness_curve(model, ioi.toks, abc.toks, metric, graph, scores, counts=[5, 19, 100])
    assert list(curve.k) == [0, 5, 19, 100, len(graph)]
    assert curve.faithfulness[0] == 0.0 and curve.faithfulness[-1] == 1.0
    assert abs(curve.faithfulness[2] - 1.0) < 0.02
    assert curve.faithfulness[1] < 0.5  # 5 of the 19 edges do not carry the task
    order = top_k_order(scores)
    sets = [[graph.edges[i] for i in order[:k]] for k in (5, 19)]
    reference = patch_edges_reference(model, ioi.toks, abc.toks, sets, metric, graph=graph, mode="keep")
    np.testing.assert_allclose(curve.metric[1:3], reference.double().numpy(), atol=1e-4)
    assert curve.clean == pytest.approx(float(metric(model(ioi.toks))), abs=1e-3)
