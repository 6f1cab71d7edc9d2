"""ioi.edges: the edge graph, exact edge patching against the hook reference and against
transformer_lens.patching, and the errors.

Models: sharp tiny random GPT-2s (``tests.ioi_batches.sharp_model``: effects O(0.1-1), so 1e-4
discriminates) of two shapes; right-padded IOI-like batches of three lengths, BOS on and off.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformer_lens.patching as tlp

from ioi.edges import Circuit, Edge, EdgeGraph, mean_sender_outputs, patch_edges, patch_edges_reference, sender_outputs
from ioi.edges.reference import sender_outputs_reference
from ioi.metrics import LogitDiff
from tests.ioi_batches import make_batch, sharp_model

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
SHAPES = ("random-L2-H4-D16", "random-L3-H2-D8")
POSITIONS = ("IO", "S1", "S1+1", "S2", "END", "other")


@pytest.fixture(scope="module", params=[(shape, bos) for shape in SHAPES for bos in (False, True)],
                ids=lambda p: f"{p[0]}-bos{int(p[1])}")
def setup(request):
    shape, bos = request.param
    model = sharp_model(shape)
    toks, new, word_idx, io, s, groups = make_batch(6, bos=bos)
    metric = LogitDiff(word_idx["END"], io, s)
    return model, toks, new, word_idx, metric, groups


def _random_sets(graph: EdgeGraph, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.0, 0.02, 0.1, 0.4, 0.8, 1.0])
    return torch.rand(len(probs), len(graph), generator=gen) < probs[:, None]


# ----------------------------------------------------------------------------------------------
# The graph
# ----------------------------------------------------------------------------------------------


def test_gpt2_small_edge_count_and_order():
    graph = EdgeGraph(12, 12)
    assert len(graph) == 32491  # ACDC's count for GPT-2 small (heads' q/k/v, MLPs, logits)
    receivers = [graph.receivers.index(e.receiver) for e in graph.edges]
    assert receivers == sorted(receivers)
    assert graph.edges[0] == Edge("embed", "a0.h0.q")
    assert graph.edges[-1] == Edge("m11", "logits")
    with_pos = EdgeGraph(2, 3, positions=("S2", "END"))
    assert len(with_pos) == 2 * len(EdgeGraph(2, 3))


def test_edge_names_round_trip_and_index():
    graph = EdgeGraph(3, 2, positions=POSITIONS)
    for i in (0, 17, len(graph) - 1):
        edge = graph.edges[i]
        assert Edge.parse(edge.name) == edge and graph.index(edge.name) == i
    assert Edge.parse("a0.h1->a2.h0.v@S1+1") == Edge("a0.h1", "a2.h0.v", "S1+1")
    assert Edge.parse("a1.h0->m1").name == "a1.h0->m1"  # MLP L reads heads of layer L


def test_circuit_json_round_trip(tmp_path):
    circuit = Circuit(edges=(Edge("embed", "logits"), Edge.parse("a0.h1->a1.h0.k@S2")),
                      scores={"embed->logits": 0.5}, method="test", meta={"tau": 0.1})
    circuit.to_json(tmp_path / "c.json")
    back = Circuit.from_json(tmp_path / "c.json")
    assert back == circuit
    assert json.loads((tmp_path / "c.json").read_text())["edges"] == circuit.names


@pytest.mark.parametrize("name, message", [
    ("a0.h0->b1.h0.q", "Unknown receiver"),
    ("x->logits", "Unknown sender"),
    ("a0.h0.q->logits", "Unknown sender"),
    ("a0.h0 logits", "Cannot parse"),
    ("a5.h0->a3.h1.q", "reads before the sender"),
    ("a2.h0->a2.h1.q", "reads before the sender"),
    ("m2->m2", "reads before the sender"),
    ("a0.h0->logits@S3", "Unknown position"),
])
def test_bad_edge_names(name, message):
    with pytest.raises(ValueError, match=message) as info:
        Edge.parse(name)
    assert "a{L}.h{H}" in str(info.value) or "reads before" in str(info.value)


def test_graph_errors():
    graph = EdgeGraph(2, 2)
    with pytest.raises(ValueError, match="has a position"):
        graph.index("a0.h0->logits@END")
    with pytest.raises(ValueError, match="not in"):
        graph.index("a5.h0->logits")
    with pytest.raises(ValueError, match="at positions"):
        EdgeGraph(2, 2, positions=("END",)).index("a0.h0->logits")
    with pytest.raises(ValueError, match="positions must be"):
        EdgeGraph(2, 2, positions=("END", "XX"))
    with pytest.raises(ValueError, match="wrap a single set"):
        graph.edge_mask(["a0.h0->logits"])
    with pytest.raises(ValueError, match="no edges"):
        Circuit(edges=()).require_nonempty("evaluation")


# ----------------------------------------------------------------------------------------------
# Fast == hook reference
# ----------------------------------------------------------------------------------------------


def test_sender_outputs_match_hooks(setup):
    model, toks, new, *_ = setup
    graph = EdgeGraph.from_model(model)
    torch.testing.assert_close(sender_outputs(model, toks, graph), sender_outputs_reference(model, toks, graph),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["patch", "keep"])
@pytest.mark.parametrize("positions", [None, POSITIONS, ("S2", "END")], ids=["allpos", "allslots", "S2END"])
def test_fast_equals_reference(setup, mode, positions):
    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=positions)
    sets = _random_sets(graph, seed=len(graph))
    fast = patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode=mode,
                       max_sets_per_batch=4)
    ref = patch_edges_reference(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode=mode)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    assert float(ref.max() - ref.min()) > 0.05  # the sets differ, so the comparison discriminates


def test_fast_equals_reference_mean_ablation_and_generic_metric(setup):
    model, toks, new, word_idx, metric, groups = setup
    graph = EdgeGraph.from_model(model, positions=("S2", "END", "other"))
    means = mean_sender_outputs(model, new, graph, groups=groups)
    sets = _random_sets(graph, seed=3)
    fast = patch_edges(model, toks, None, sets, metric, graph=graph, word_idx=word_idx,
                       mean_activations=means, mode="keep")
    ref = patch_edges_reference(model, toks, None, sets, metric, graph=graph, word_idx=word_idx,
                                mean_activations=means, mode="keep")
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)

    def last_real_logit(logits):  # a generic callable: full logits path
        return logits[torch.arange(len(toks)), metric.end_idx].logsumexp(-1).mean()

    fast = patch_edges(model, toks, new, sets, last_real_logit, graph=graph, word_idx=word_idx)
    ref = patch_edges_reference(model, toks, new, sets, last_real_logit, graph=graph, word_idx=word_idx)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)


def test_chunking_does_not_change_results(setup):
    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=("S2", "END"))
    sets = _random_sets(graph, seed=5)
    whole = patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx)
    tiny = patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, memory_budget_mb=0.01)
    torch.testing.assert_close(whole, tiny, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", [None, POSITIONS], ids=["allpos", "allslots"])
def test_length_grouped_prompt_chunks_match_reference(setup, monkeypatch, positions):
    """Prompts of three lengths, grouped by length (MIN_CHUNK_ROWS=0: a chunk per length, each cut
    after its own END; and one prompt per chunk) equal the hook reference on the whole padded batch."""
    from ioi.edges import patching as edge_patching
    from ioi.plain_forward import length_chunks

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=positions)
    sets = _random_sets(graph, seed=11)
    monkeypatch.setattr(edge_patching, "MIN_CHUNK_ROWS", 0)
    chunks = length_chunks(metric.end_idx, len(toks), 0)
    assert len(chunks) == len(set(metric.end_idx.tolist())) >= 2  # several one-length chunks
    assert any(len(c) > 1 for c in chunks) and all(len(set(metric.end_idx[c].tolist())) == 1 for c in chunks)
    ref = patch_edges_reference(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep")
    grouped = patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep")
    single = patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep",
                         memory_budget_mb=0.01)
    torch.testing.assert_close(grouped, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(single, ref, atol=ATOL, rtol=0)
    assert float(ref.max() - ref.min()) > 0.05


def test_parallel_set_chunks_match_reference_and_repeat(setup):
    """2 torch threads: chunks of sets on 2 worker threads (one torch thread each) equal the hook
    reference and the serial path, and a repeat is bit-identical."""
    from ioi.edges import patching as edge_patching

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=("S2", "END", "other"))
    sets = _random_sets(graph, seed=7)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert edge_patching._workers(torch.device("cpu")) == 2
        runs = [patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep",
                            max_sets_per_batch=2) for _ in range(2)]
        edge_patching.PARALLEL_SETS = False
        serial = patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep",
                             max_sets_per_batch=2)
        assert torch.get_num_threads() == 2
    finally:
        edge_patching.PARALLEL_SETS = True
        torch.set_num_threads(previous)
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], serial, atol=1e-6, rtol=0)
    ref = patch_edges_reference(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep")
    torch.testing.assert_close(runs[0], ref, atol=ATOL, rtol=0)
    assert float(ref.max() - ref.min()) > 0.05


# ----------------------------------------------------------------------------------------------
# Fast == activation patching (transformer_lens.patching, run on clean, corrupted patched in)
# ----------------------------------------------------------------------------------------------


def _whole_layer_setter(act, index, patch):
    act[...] = patch
    return act


def test_every_edge_into_a_receiver_is_activation_patching_of_its_input(setup):
    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model)
    _, corrupted_cache = model.run_with_cache(new)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    receivers = [f"a{l}.h{h}.{p}" for p in "qkv" for l in range(L) for h in range(H)]
    receivers += [f"m{l}" for l in range(L)] + ["logits"]
    sets = [[e for e in graph.edges if e.receiver == r] for r in receivers]
    fast = patch_edges(model, toks, new, sets, metric, graph=graph)
    expected = [tlp.get_act_patch_attn_head_q_all_pos(model, toks, corrupted_cache, metric).flatten(),
                tlp.get_act_patch_attn_head_k_all_pos(model, toks, corrupted_cache, metric).flatten(),
                tlp.get_act_patch_attn_head_v_all_pos(model, toks, corrupted_cache, metric).flatten(),
                tlp.generic_activation_patch(model, toks, corrupted_cache, metric, _whole_layer_setter,
                                             "mlp_out", index_axis_names=("layer",)).flatten(),
                metric(model(new))[None]]
    torch.testing.assert_close(fast, torch.cat(expected).float(), atol=ATOL, rtol=0)


def test_every_edge_out_of_a_node_is_patching_its_output(setup):
    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model)
    _, corrupted_cache = model.run_with_cache(new)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    senders = [f"a{l}.h{h}" for l in range(L) for h in range(H)] + [f"m{l}" for l in range(L)]
    sets = [[e for e in graph.edges if e.sender == s] for s in senders]
    fast = patch_edges(model, toks, new, sets, metric, graph=graph)
    expected = torch.cat([
        tlp.get_act_patch_attn_head_out_all_pos(model, toks, corrupted_cache, metric).flatten(),
        tlp.generic_activation_patch(model, toks, corrupted_cache, metric, _whole_layer_setter,
                                     "mlp_out", index_axis_names=("layer",)).flatten(),
    ]).float()
    torch.testing.assert_close(fast, expected, atol=ATOL, rtol=0)
    assert float(expected.abs().max()) > 0.05


def test_empty_and_full_sets(setup):
    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=POSITIONS)
    clean, corrupted = float(metric(model(toks))), float(metric(model(new)))
    patched = patch_edges(model, toks, new, [[], graph.edges], metric, graph=graph, word_idx=word_idx)
    kept = patch_edges(model, toks, new, [[], graph.edges], metric, graph=graph, word_idx=word_idx, mode="keep")
    torch.testing.assert_close(patched, torch.tensor([clean, corrupted]), atol=ATOL, rtol=0)
    torch.testing.assert_close(kept, torch.tensor([corrupted, clean]), atol=ATOL, rtol=0)


def test_repeated_sets_are_evaluated_once_and_returned_in_place(setup, monkeypatch):
    from ioi.edges import patching as edge_patching

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=("S2", "END"))
    sets = _random_sets(graph, seed=13)
    repeated = torch.cat([sets[3:], sets, sets[:2]])  # every set twice or more, out of order
    seen = []
    run = edge_patching.EdgeForward.run
    monkeypatch.setattr(edge_patching.EdgeForward, "run",
                        lambda self, toks, masks, *a, **k: (k.get("end_pos") is not None and seen.append(masks.shape[0]))
                        or run(self, toks, masks, *a, **k))
    values = patch_edges(model, toks, new, repeated, metric, graph=graph, word_idx=word_idx, mode="keep")
    assert sum(seen) == len(sets)  # one prompt chunk (the corrupted run not counted): each distinct set once
    ref = patch_edges_reference(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep")
    torch.testing.assert_close(values, torch.cat([ref[3:], ref, ref[:2]]), atol=ATOL, rtol=0)


def _nested_sets(graph: EdgeGraph, seed: int) -> torch.Tensor:
    """Top-n sets of a random ranking (nested, n from 0 to every edge), shuffled, plus two random
    sets: a faithfulness curve's sets, not in any order that shares prefixes."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(graph), generator=gen)
    sizes = sorted({0, 1, 2, 3, 5, 9, 17, len(graph) // 4, len(graph) // 2, len(graph) - 3, len(graph)})
    sets = torch.zeros(len(sizes) + 2, len(graph), dtype=torch.bool)
    for i, n in enumerate(sizes):
        sets[i, order[:n]] = True
    sets[-2:] = torch.rand(2, len(graph), generator=gen) < 0.5
    return sets[torch.randperm(len(sets), generator=gen)]


@pytest.mark.parametrize("positions", [None, POSITIONS], ids=["allpos", "allslots"])
def test_resumed_sets_equal_independent_passes_and_reference(setup, positions):
    """One set a pass (as at GPT-2 scale), sets in trie order, each resumed from the previous pass:
    equal to independent passes (RESUME_SETS off) to float32 rounding and to the hook reference,
    in the caller's order; stages are actually skipped; on 2 threads (prompt chunks on 2 workers,
    one prompt a chunk) the same values, and a repeat is bit-identical."""
    from ioi.edges import patching as edge_patching

    model, toks, new, word_idx, metric, groups = setup
    graph = EdgeGraph.from_model(model, positions=positions)
    sets = _nested_sets(graph, seed=len(graph))
    stats: dict = {}
    resumed = patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep",
                          max_sets_per_batch=1, stats=stats)
    assert stats["runs"] == len(sets) and stats["stages_skipped"] > 0
    assert stats["stages_run"] + stats["stages_skipped"] == stats["runs"] * stats["n_stages"]
    edge_patching.RESUME_SETS = False
    try:
        independent = patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep",
                                  max_sets_per_batch=1)
    finally:
        edge_patching.RESUME_SETS = True
    torch.testing.assert_close(resumed, independent, atol=1e-6, rtol=0)
    ref = patch_edges_reference(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep")
    torch.testing.assert_close(resumed, ref, atol=ATOL, rtol=0)
    assert float(ref.max() - ref.min()) > 0.05
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = [patch_edges(model, toks, new, sets, metric, graph=graph, word_idx=word_idx, mode="keep",
                                memory_budget_mb=0.01) for _ in range(2)]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(parallel[0], parallel[1])
    torch.testing.assert_close(parallel[0], ref, atol=ATOL, rtol=0)
    if positions is None:  # mean ablation through the same path
        means = mean_sender_outputs(model, new, graph, groups=groups)
        fast = patch_edges(model, toks, None, sets[:5], metric, graph=graph, mean_activations=means, mode="keep",
                           max_sets_per_batch=1)
        ref = patch_edges_reference(model, toks, None, sets[:5], metric, graph=graph, mean_activations=means,
                                    mode="keep")
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)


def test_resume_fills_a_difference_no_earlier_set_wrote(setup):
    """Patch mode: the empty set runs first and reads no head on its own (their differences are not
    written); the next sets patch a0.h0 -> logits, then also a0.h1 -> logits: their masks differ
    at the logits alone, so they resume at the last layer, and the differences of a0.h0 and a0.h1
    they read are computed from layer 0's saved attention output. Equal to the hook reference."""
    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model)
    sets = [["a0.h0->logits", "a0.h1->logits"], [], ["a0.h0->logits"]]
    stats: dict = {}
    fast = patch_edges(model, toks, new, sets, metric, graph=graph, max_sets_per_batch=1, stats=stats)
    ref = patch_edges_reference(model, toks, new, sets, metric, graph=graph)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    assert min(abs(float(ref[0] - ref[1])), abs(float(ref[2] - ref[1]))) > 1e-3  # both edges matter
    assert stats["stages_skipped"] == 2 * 2 * (model.cfg.n_layers - 1)  # two sets resumed at the last layer


def test_patching_errors(setup):
    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=("END",))
    with pytest.raises(ValueError, match="word_idx"):
        patch_edges(model, toks, new, [[]], metric, graph=graph)
    with pytest.raises(ValueError, match="mode must be"):
        patch_edges(model, toks, new, [[]], metric, graph=graph, word_idx=word_idx, mode="ablate")
    with pytest.raises(ValueError, match="exactly one"):
        patch_edges(model, toks, None, [[]], metric, graph=graph, word_idx=word_idx)
    with pytest.raises(ValueError, match="does not match the model"):
        patch_edges(model, toks, new, [[]], metric, graph=EdgeGraph(7, 1))
    with pytest.raises(ValueError, match="must match"):
        patch_edges(model, toks, new[:, :-1], [[]], metric, graph=graph, word_idx=word_idx)


# ----------------------------------------------------------------------------------------------
# Attribution
# ----------------------------------------------------------------------------------------------


def test_eap_is_the_finite_difference_linearisation(setup):
    """EAP score of each edge == d/d eps metric(edge carries eps * (corrupted - clean)) at 0,
    by central differences of exact edge patching (mean-ablation values clean +- eps * delta)."""
    from ioi.edges import eap_scores

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=("S2", "other"))
    scores = eap_scores(model, toks, new, metric, graph, word_idx=word_idx, memory_budget_mb=0.05)
    clean, corrupted = sender_outputs(model, toks, graph), sender_outputs(model, new, graph)
    eps, single = 1e-2, torch.eye(len(graph), dtype=torch.bool)
    plus, minus = (patch_edges(model, toks, None, single, metric, graph=graph, word_idx=word_idx,
                               mean_activations=clean + sign * eps * (corrupted - clean)) for sign in (1, -1))
    fd = (plus - minus) / (2 * eps)
    torch.testing.assert_close(scores, fd, atol=1e-3, rtol=1e-3)
    assert float(fd.abs().max()) > 0.02


def test_attribution_length_grouped_chunks_equal_one_padded_chunk(setup, monkeypatch):
    """EAP and EAP-IG with prompts grouped by length (a chunk per length, each cut after its own
    END) equal the same scores from a generic metric on the whole padded batch (one chunk)."""
    from ioi.edges import eap_ig_scores, eap_scores
    from ioi.edges import patching as edge_patching

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=("S2", "END", "other"))
    rows = torch.arange(len(toks))

    def padded_ld(logits):  # the same logit difference, read off full logits of the padded batch
        at_end = logits[rows, metric.end_idx]
        return metric.reduce(at_end[rows, metric.io_ids] - at_end[rows, metric.s_ids])

    monkeypatch.setattr(edge_patching, "MIN_CHUNK_ROWS", 0)
    for scores in (eap_scores, lambda *a, **k: eap_ig_scores(*a, steps=2, **k)):
        grouped = scores(model, toks, new, metric, graph, word_idx=word_idx)
        padded = scores(model, toks, new, padded_ld, graph, word_idx=word_idx)
        torch.testing.assert_close(grouped, padded, atol=1e-5, rtol=0)
        assert float(padded.abs().max()) > 0.02


def test_eap_ig_right_rule_one_step_is_eap(setup):
    from ioi.edges import eap_ig_scores, eap_scores

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model)
    eap = eap_scores(model, toks, new, metric, graph)
    torch.testing.assert_close(eap_ig_scores(model, toks, new, metric, graph, steps=1, rule="right"), eap,
                               atol=1e-5, rtol=0)


def test_eap_and_eap_ig_in_one_pass_equal_the_separate_runs(setup):
    """The shared pass (one corrupted run; EAP-IG's differences from the EAP pass) gives EAP
    bit-identical to eap_scores and EAP-IG within fp32 rounding of eap_ig_scores; chunked (a tiny
    memory budget) on a per-position graph; and EAP-IG with one right-rule step is EAP."""
    from ioi.edges import eap_and_eap_ig_scores, eap_ig_scores, eap_scores

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model, positions=("S2", "END", "other"))
    kw = dict(word_idx=word_idx, memory_budget_mb=0.05)
    both = eap_and_eap_ig_scores(model, toks, new, metric, graph, steps=3, **kw)
    assert torch.equal(both["eap"], eap_scores(model, toks, new, metric, graph, **kw))
    torch.testing.assert_close(both["eap_ig"], eap_ig_scores(model, toks, new, metric, graph, steps=3, **kw),
                               atol=1e-5, rtol=0)
    assert float(both["eap_ig"].abs().max()) > 0.02 and not torch.equal(both["eap_ig"], both["eap"])
    one = eap_and_eap_ig_scores(model, toks, new, metric, graph, steps=1, rule="right", **kw)
    torch.testing.assert_close(one["eap_ig"], one["eap"], atol=1e-5, rtol=0)


def test_eap_and_eap_ig_in_one_pass_approach_the_exact_edge_effect():
    """Against exact edge patching on the embedding-only model (linear receivers): the shared
    pass's EAP-IG (midpoint, 64 steps) is within 1e-3 of the exact effect, its EAP is not."""
    from ioi.edges import eap_and_eap_ig_scores

    model = _embedding_only_model()
    toks, new, word_idx, io, s, _ = make_batch(6)
    metric = LogitDiff(word_idx["S2"], io, s)
    graph = EdgeGraph.from_model(model, positions=("S2", "END", "other"))
    exact = patch_edges(model, toks, new, torch.eye(len(graph), dtype=torch.bool), metric, graph=graph,
                        word_idx=word_idx) - float(metric(model(toks)))
    both = eap_and_eap_ig_scores(model, toks, new, metric, graph, steps=64, rule="midpoint", word_idx=word_idx)
    assert float((both["eap"] - exact).abs().max()) > 1
    assert float((both["eap_ig"] - exact).abs().max()) < 1e-3


def _embedding_only_model():
    """Every sender but the embedding writes a constant (value and MLP-output weights zeroed), so
    each receiver's input is affine in the interpolated embedding; ln_final stays nonlinear."""
    from transformers import GPT2LMHeadModel

    from ioi.models import bridge_from_hf, random_gpt2_config
    from ioi.tokenizer import get_gpt2_tokenizer

    config = random_gpt2_config(2, 4, 16)
    config.initializer_range = 0.2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in hf.transformer.h:
            block.attn.c_attn.weight[:, 2 * config.n_embd :] = 0
            block.mlp.c_proj.weight.zero_()
    return bridge_from_hf(hf, get_gpt2_tokenizer(), device=torch.device("cpu"))


def test_eap_ig_approaches_the_exact_edge_effect():
    from ioi.edges import eap_ig_scores, eap_scores

    model = _embedding_only_model()
    toks, new, word_idx, io, s, _ = make_batch(6)
    metric = LogitDiff(word_idx["S2"], io, s)  # read where clean and corrupted tokens differ
    graph = EdgeGraph.from_model(model, positions=("S2", "END", "other"))
    clean = float(metric(model(toks)))
    exact = patch_edges(model, toks, new, torch.eye(len(graph), dtype=torch.bool), metric, graph=graph,
                        word_idx=word_idx) - clean
    assert abs(float(exact[graph.index("embed->logits@S2")])) > 1
    eap_error = float((eap_scores(model, toks, new, metric, graph, word_idx=word_idx) - exact).abs().max())
    errors = {rule: [float((eap_ig_scores(model, toks, new, metric, graph, steps=m, rule=rule, word_idx=word_idx)
                            - exact).abs().max()) for m in (4, 16, 64)] for rule in ("left", "midpoint")}
    assert eap_error > 1
    for rule, errs in errors.items():
        assert errs[0] > errs[1] > errs[2], (rule, errs)
    assert errors["left"][2] < 0.01 * abs(float(exact.abs().max()))  # O(1/m)
    assert errors["midpoint"][2] < 1e-3  # O(1/m^2)


def test_attribution_errors(setup):
    from ioi.edges import eap_ig_scores, eap_scores

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model)
    with pytest.raises(ValueError, match="steps must be"):
        eap_ig_scores(model, toks, new, metric, graph, steps=0)
    with pytest.raises(ValueError, match="rule must be"):
        eap_ig_scores(model, toks, new, metric, graph, rule="trapezoid")
    with pytest.raises(ValueError, match="scalar metric"):
        eap_scores(model, toks, new, LogitDiff(metric.end_idx, metric.io_ids, metric.s_ids, per_prompt=True), graph)


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------


def _sequential_acdc(model, toks, new, metric, graph, tau, word_idx):
    """The definition, one exact patch_edges call per tested edge (no resume, batching or skips)."""
    removed = torch.zeros(len(graph), dtype=torch.bool)

    def value():
        return float(patch_edges(model, toks, new, removed[None], metric, graph=graph, word_idx=word_idx)[0])

    current = value()
    for r in reversed(range(len(graph.receivers))):
        incoming = [i for i in range(len(graph)) if int(graph.receiver_index[i]) == r]
        for i in sorted(incoming, key=lambda i: (-int(graph.sender_index[i]), int(graph.slot_index[i]))):
            removed[i] = True
            new_value = value()
            if abs(new_value - current) < tau:
                current = new_value
            else:
                removed[i] = False
    return {graph.edges[i] for i in range(len(graph)) if not removed[i]}, current


def test_acdc_equals_the_sequential_definition():
    from ioi.edges import acdc

    model = sharp_model("random-L3-H2-D8")
    toks, new, word_idx, io, s, _ = make_batch(6, bos=True)
    metric = LogitDiff(word_idx["END"], io, s)
    graph = EdgeGraph.from_model(model, positions=("S2", "END", "other"))
    circuit = acdc(model, toks, new, metric, graph, 3e-3, word_idx=word_idx)
    expected, final = _sequential_acdc(model, toks, new, metric, graph, 3e-3, word_idx)
    assert 10 < len(expected) < len(graph) // 2
    assert set(circuit.edges) == expected
    assert circuit.meta["metric_final"] == pytest.approx(final, abs=ATOL)
    kept = patch_edges(model, toks, new, [circuit], metric, graph=graph, word_idx=word_idx, mode="keep")
    assert float(kept[0]) == pytest.approx(final, abs=ATOL)
    assert len(acdc(model, toks, new, metric, graph, 0.0, word_idx=word_idx)) == len(graph)  # strict <


def test_acdc_finds_the_planted_dependency():
    """In the embedding-only model the only edge that matters for the logit difference read at S2
    is embed -> logits at S2 (every other sender writes a constant): ACDC keeps exactly it."""
    from ioi.edges import acdc

    model = _embedding_only_model()
    toks, new, word_idx, io, s, _ = make_batch(6)
    metric = LogitDiff(word_idx["S2"], io, s)
    graph = EdgeGraph.from_model(model, positions=("S2", "END", "other"))
    for criterion, tau in (("abs_ld", 0.01), ("kl", 1e-4)):
        circuit = acdc(model, toks, new, metric, graph, tau, word_idx=word_idx, criterion=criterion)
        assert circuit.names == ["embed->logits@S2"], criterion


def test_selection_and_rollup():
    from ioi.edges import rollup_to_heads, threshold, top_n

    graph = EdgeGraph(2, 2, positions=("S2", "END"))
    scores = torch.zeros(len(graph))
    picks = {"a1.h0->logits@END": 3.0, "a0.h1->a1.h0.q@END": -2.0, "a0.h1->a1.h0.k@S2": 1.0, "embed->m0@S2": 0.5}
    for name, value in picks.items():
        scores[graph.index(name)] = value
    top = top_n(scores, graph, 3)
    assert set(top.names) == set(list(picks)[:3])
    assert top.scores["a0.h1->a1.h0.q@END"] == -2.0
    assert set(threshold(scores, graph, 1.0).names) == set(top.names)
    assert threshold(scores, graph, 1.0, absolute=False).names == ["a0.h1->a1.h0.k@S2", "a1.h0->logits@END"]
    nodes = rollup_to_heads(top)
    assert nodes["a1.h0"]["in_edges"] == 2 and nodes["a1.h0"]["out_edges"] == 1
    assert nodes["a1.h0"]["inputs"] == {"q": 1, "k": 1, "v": 0}
    assert nodes["a0.h1"]["out_score"] == 3.0 and nodes["logits"]["in_positions"] == {"END": 1}
    assert (nodes["a1.h0"]["layer"], nodes["a1.h0"]["head"]) == (1, 0)


def test_discovery_errors(setup):
    from ioi.edges import acdc, rollup_to_heads, threshold, top_n

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model)
    with pytest.raises(ValueError, match="tau must be"):
        acdc(model, toks, new, metric, graph, -0.1)
    with pytest.raises(ValueError, match="criterion must be"):
        acdc(model, toks, new, metric, graph, 0.1, criterion="l2")
    scores = torch.zeros(len(graph))
    with pytest.raises(ValueError, match="No edge"):
        threshold(scores, graph, 1.0)
    assert len(threshold(scores, graph, 1.0, allow_empty=True)) == 0
    with pytest.raises(ValueError, match="threshold on"):
        threshold(scores, graph, -1.0)
    with pytest.raises(ValueError, match="n must be"):
        top_n(scores, graph, 0)
    with pytest.raises(ValueError, match="one per edge"):
        top_n(scores[:-1], graph, 1)
    with pytest.raises(ValueError, match="no edges"):
        rollup_to_heads(Circuit(edges=()))


def test_eap_under_inference_mode_after_patching(setup):
    """The pipeline runs under torch.inference_mode: attribution must still work after a patching
    call cached the engine's weights as inference tensors."""
    from ioi.edges import eap_scores

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model)
    expected = eap_scores(model, toks, new, metric, graph)
    from ioi.patching import _fast_forward

    _fast_forward._WEIGHT_CACHE.pop(model, None)  # re-read the weights under inference mode
    with torch.inference_mode():
        patch_edges(model, toks.clone(), new.clone(), [[]], metric, graph=graph)
        got = eap_scores(model, toks.clone(), new.clone(), metric, graph)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_ln_projection_vjp_equals_the_layer_norm_vjp_of_the_projected_gradient():
    """The folded backward (LayerNorm weight in W, 1/std in the small gradient) equals the plain
    LayerNorm VJP of grad_out @ W^T, with and without a LayerNorm weight."""
    from ioi.edges._engine import _ln_projection_vjp, _ln_vjp

    gen = torch.Generator().manual_seed(0)
    for has_weight in (False, True):
        x = torch.randn(50, 64, generator=gen) * 3 + 1
        W, grad_out = torch.randn(12, 64, 16, generator=gen), torch.randn(12, 50, 16, generator=gen)
        weight = torch.rand(64, generator=gen) + 0.5 if has_weight else None
        expected = _ln_vjp(x, torch.bmm(grad_out, W.transpose(1, 2)), weight, 1e-5)
        torch.testing.assert_close(_ln_projection_vjp(x, grad_out, W, weight, 1e-5), expected, atol=1e-5, rtol=0)
        assert float(expected.abs().max()) > 1


def test_trie_walk_cut_into_pieces_of_equal_work_on_two_threads(setup):
    """On 2 worker threads the trie walk is cut into 2 consecutive pieces (each its own job per
    prompt chunk, started from scratch): the pieces cover the walk in order, every set is run once
    per chunk, and the values equal the 1-thread walk to float32 rounding and the hook reference."""
    from ioi.edges import patching as edge_patching

    model, toks, new, word_idx, metric, _ = setup
    graph = EdgeGraph.from_model(model)
    sets = _nested_sets(graph, seed=3)
    engine = edge_patching.edge_forward(model, graph)
    mask, _ = edge_patching._distinct_sets(edge_patching.set_masks(graph, sets, "keep"))
    order = edge_patching._trie_order(mask)
    pieces = edge_patching._trie_parts(engine, graph.dense_masks(mask), order, 2)
    assert len(pieces) == 2 and all(pieces) and pieces[0] + pieces[1] == order
    serial = patch_edges(model, toks, new, sets, metric, graph=graph, mode="keep", max_sets_per_batch=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats: dict = {}
        parallel = patch_edges(model, toks, new, sets, metric, graph=graph, mode="keep", max_sets_per_batch=1,
                               memory_budget_mb=0.01, stats=stats)
    finally:
        torch.set_num_threads(previous)
    assert stats["trie_pieces"] == 2 and stats["runs"] == len(mask) * len(toks)  # one prompt a chunk
    torch.testing.assert_close(parallel, serial, atol=1e-6, rtol=0)
    ref = patch_edges_reference(model, toks, new, sets, metric, graph=graph, mode="keep")
    torch.testing.assert_close(parallel, ref, atol=ATOL, rtol=0)
