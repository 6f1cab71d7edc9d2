"""The planted circuit's edges (ioi.planted.CIRCUIT_EDGES, derived from how the weights are built)
checked by exact edge patching (p_ABC into p_IOI, ioi.edges.patch_edges): every planted edge
moves the mean logit difference by at least EDGE_MATTERS_LD, and the edges not planted are inert
(below EDGE_INERT_LD), on the position-free graph and on the per-position graph.

Inertness is checked per receiver: all of a receiver's non-planted incoming edges patched together
(53 sets instead of 460 single edges: a large single effect would show unless cancelled exactly by
another edge of the same receiver), and all non-planted edges of the graph together.
"""

from __future__ import annotations

import pytest
import torch

from ioi import planted
from ioi.data import IOIDataset
from ioi.edges import Edge, EdgeGraph, patch_edges
from ioi.metrics import LogitDiff
from ioi.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

N = 12
POSITIONS = ("IO", "S1", "S1+1", "S2", "END", "other")


@pytest.fixture(scope="module")
def setup():
    model = load_model("planted-ioi", device="cpu")
    ioi = IOIDataset("mixed", N=N, seed=0)
    abc = ioi.abc_dataset(seed=0)
    return model, ioi, abc, LogitDiff.from_dataset(ioi)


def _effects(setup, graph, edge_sets):
    model, ioi, abc, metric = setup
    values = patch_edges(model, ioi.toks, abc.toks, [[]] + list(edge_sets), metric, graph=graph,
                         word_idx=ioi.word_idx)
    return values[1:] - values[0]


def test_planted_edges_are_circuit_heads_only():
    graph = EdgeGraph.from_model(n_layers=planted.N_LAYERS, n_heads=planted.N_HEADS)
    edges = planted.circuit_edges()
    assert len(edges) == 19 and len(set(edges)) == 19
    circuit_nodes = {f"a{l}.h{h}" for heads in planted.CIRCUIT.values() for l, h in heads}
    touched = set()
    for edge in edges:
        graph.index(edge)  # a valid edge of the model's graph
        receiver_node = edge.receiver.rsplit(".", 1)[0] if edge.receiver != "logits" else "logits"
        assert edge.sender in circuit_nodes | {"embed"}, edge
        assert receiver_node in circuit_nodes | {"logits"}, edge
        touched |= {edge.sender, receiver_node}
    assert circuit_nodes <= touched  # every planted head is on the circuit
    positional = planted.circuit_edges(POSITIONS)
    assert len(positional) == 21 and {e.position for e in positional} <= set(POSITIONS)
    with pytest.raises(ValueError, match="position labels"):
        planted.circuit_edges(("END",))


@pytest.mark.parametrize("positions", [None, POSITIONS], ids=["no-positions", "positions"])
def test_planted_edges_matter_and_the_others_are_inert(setup, positions):
    graph = EdgeGraph.from_model(setup[0], positions=positions)
    truth = planted.circuit_edges(positions)
    truth_set = set(truth)
    by_receiver: dict[str, list[Edge]] = {}
    for edge in graph.edges:
        if edge not in truth_set:
            by_receiver.setdefault(edge.receiver, []).append(edge)
    others = [e for e in graph.edges if e not in truth_set]
    groups = list(by_receiver.values())
    effects = _effects(setup, graph, [[e] for e in truth] + groups + [others])
    single = effects[: len(truth)]
    grouped = effects[len(truth): len(truth) + len(groups)]
    weak = [e for e in truth if abs(float(single[truth.index(e)])) < planted.EDGE_MATTERS_LD]
    assert not weak, f"planted edges with |effect| < {planted.EDGE_MATTERS_LD}: " + ", ".join(
        f"{e.name} {float(single[truth.index(e)]):+.3f}" for e in weak)
    loud = [(receiver, float(v)) for receiver, v in zip(by_receiver, grouped)
            if abs(float(v)) >= planted.EDGE_INERT_LD]
    assert not loud, f"receivers whose non-planted edges move the LD by >= {planted.EDGE_INERT_LD}: {loud}"
    assert abs(float(effects[-1])) < planted.EDGE_INERT_LD, float(effects[-1])


def test_dropping_a_planted_edge_from_the_truth_is_caught(setup):
    """The inertness check can fail: with one planted edge moved to the 'others', its receiver's
    group is loud."""
    graph = EdgeGraph.from_model(setup[0])
    dropped = Edge.parse("a0.h3->a2.h0.v")
    group = [e for e in graph.edges if e.receiver == dropped.receiver and
             (e not in set(planted.circuit_edges()) or e == dropped)]
    (effect,) = _effects(setup, graph, [group])
    assert abs(float(effect)) >= planted.EDGE_MATTERS_LD


def test_the_planted_circuit_alone_keeps_the_logit_difference(setup):
    """Keep mode (circuit evaluation): the 19 planted edges clean, every other edge from p_ABC."""
    model, ioi, abc, metric = setup
    graph = EdgeGraph.from_model(model)
    values = patch_edges(model, ioi.toks, abc.toks, [planted.circuit_edges(), list(graph.edges), []],
                         metric, graph=graph, mode="keep")
    circuit, full, empty = (float(v) for v in values)
    assert abs(circuit - full) < planted.EDGE_INERT_LD, (circuit, full)
    assert empty < 0.5 * full  # with nothing kept, the task is gone
    with torch.no_grad():
        assert abs(full - float(metric(model(ioi.toks)))) < 1e-3
