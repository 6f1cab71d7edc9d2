"""The batched knockout engine (ioi.ablation_engine, behind ioi.ablation and the circuit
evaluator) against the hooked-bridge reference (ioi.ablation_reference), to 1e-4: several random
shapes, BOS on and off, padded batches (templates of different lengths), batched passes with
resumes (K ∪ {v} from K), memory chunking, MLP knockouts, full logits, the planted model; and
bit-identical results between two runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ioi import ablation as fast
from ioi import ablation_reference as ref
from ioi.ablation_engine import KnockoutEngine, KnockoutSpec, balanced_cuts
from ioi.experiments import circuit_eval as ce
from ioi.metrics import LogitDiff
from ioi_batches import make_batch, sharp_model

ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = ("random-L3-H4-D16", "random-L2-H3-D8")


class _Batch:
    """IOI-like prompts of three lengths (right-padded) as the evaluator reads a dataset."""

    def __init__(self, n: int, bos: bool, seed: int = 0):
        self.toks, self.abc, self.word_idx, self.io_token_ids, self.s_token_ids, self.groups = make_batch(
            n, bos, seed, 12, 3)

    def __len__(self) -> int:
        return len(self.toks)


def _circuit(L: int, H: int, wi) -> dict:
    """Five heads kept at END, S2 and S1+1 (every class position), two at END in the last layer."""
    return {(L - 1, 0): wi["END"], (L - 1, H - 1): wi["END"], (1, 1): wi["S2"], (0, 2): wi["S1+1"],
            (0, 0): wi["END"]}


def _reference(model, batch, means, circuit, k, mode):
    metric = LogitDiff(batch.word_idx["END"], batch.io_token_ids, batch.s_token_ids, per_prompt=True)
    return ref.evaluate_circuit(model, batch.toks, metric, means, circuit, knockout=sorted(k),
                                knockout_mode=mode).double()


@pytest.mark.parametrize("spec", SHAPES)
@pytest.mark.parametrize("bos", [False, True])
def test_batched_evaluator_with_resumes_matches_reference(spec, bos):
    """F(C), F(C\\K), F(M\\K) from prefetch passes (each set resuming from a stored subset, as the
    greedy search does) equal one hooked bridge pass each."""
    model = sharp_model(spec)
    batch = _Batch(7, bos)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    means = fast.compute_template_means(model, batch.abc, batch.groups)
    circuit = _circuit(L, H, batch.word_idx)
    heads = list(circuit)
    clean = ce.CleanRun.build(model, batch, memory_budget_mb=64)
    evaluator = clean.evaluator(means, circuit, batch)
    torch.testing.assert_close(evaluator.f_circuit, _reference(model, batch, means, circuit, [], "all_positions"),
                               atol=ATOL, rtol=0)
    first = [frozenset({heads[0]}), frozenset({heads[2]}), frozenset({heads[3]})]
    evaluator.prefetch(first)
    second = [first[1] | {h} for h in heads if h not in first[1]] + [first[2] | {heads[0]}]
    evaluator.prefetch(second)  # resumes from {heads[2]} / {heads[3]} at the new head's layer
    assert evaluator.engine.flops.passes >= 4
    for k in first + second:
        torch.testing.assert_close(evaluator.without(k), _reference(model, batch, means, circuit, k, "all_positions"),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(evaluator.model_without(k),
                                   _reference(model, batch, means, circuit, k, "relevant_positions"),
                                   atol=ATOL, rtol=0)


def test_resume_skips_layers_and_chunking_changes_nothing():
    """A K ∪ {v} set starts at v's layer from K's run; a tiny memory budget (one spec per chunk)
    gives the same numbers as one pass."""
    model = sharp_model("random-L3-H4-D16")
    batch = _Batch(6, False)
    means = fast.compute_template_means(model, batch.abc, batch.groups)
    circuit = _circuit(3, 4, batch.word_idx)
    ld = {"end": batch.word_idx["END"], "io_ids": batch.io_token_ids, "s_ids": batch.s_token_ids}
    results = []
    for budget in (64, 0):
        engine = KnockoutEngine(model, batch.toks, head_means=means, memory_budget_mb=budget, **ld)
        keep = fast.circuit_keep_mask(circuit, 6, engine.seq, 3, 4)
        k_keep = keep.clone()
        k_keep[:, :, 0, 2] = False
        base = engine.evaluate([KnockoutSpec(k_keep, "ablated", capture=True)])[0]
        specs = []
        for head in ((2, 0), (1, 1), (0, 0)):
            more = k_keep.clone()
            more[:, :, head[0], head[1]] = False
            specs.append(KnockoutSpec(more, "ablated"))
        runs = engine.evaluate(specs, bases=[base])
        # (0, 0) removed: nothing is kept below layer 1 any more, so the all-ablated source wins
        assert [run.start for run in runs] == [2, 1, 1] and [run.base is base for run in runs] == [True, True, False]
        results.append(torch.stack([run.ld for run in runs]))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bos, parts", [(False, False), (True, False), (True, True)])
def test_head_mlp_knockouts_and_full_logits_match_reference(bos, parts, request, monkeypatch):
    """Head and MLP knockouts, the MLP sweep and full logits (no END) equal the hooked reference;
    with ``parts`` on 2 torch threads, in prompt parts (a spy checks that every pass ran in 2)."""
    passes = []
    if parts:
        request.getfixturevalue("two_threads")
        in_parts = KnockoutEngine._evaluate_parts
        monkeypatch.setattr(KnockoutEngine, "_evaluate_parts",
                            lambda self, *a: passes.append(a[-1]) or in_parts(self, *a))
    model = sharp_model("random-L3-H4-D16")
    batch = _Batch(6, bos)
    wi = batch.word_idx
    means = fast.compute_template_means(model, batch.abc, batch.groups)
    mlp_means = fast.compute_template_means(model, batch.abc, batch.groups, component="mlp_out")
    metric = LogitDiff(wi["END"], batch.io_token_ids, batch.s_token_ids, per_prompt=True)
    toks = batch.toks
    heads = {(2, 0): wi["END"], (1, 2): [wi["S2"], wi["S1+1"]], (0, 1): None}
    torch.testing.assert_close(fast.knockout_heads(model, toks, metric, means, heads),
                               ref.knockout_heads(model, toks, metric, means, heads), atol=ATOL, rtol=0)
    for layers, positions in (([0], None), ([2], wi["END"]), (range(1, 3), None)):
        torch.testing.assert_close(fast.knockout_mlps(model, toks, metric, mlp_means, layers, positions),
                                   ref.knockout_mlps(model, toks, metric, mlp_means, layers, positions),
                                   atol=ATOL, rtol=0)
    mean_metric = LogitDiff(wi["END"], batch.io_token_ids, batch.s_token_ids)
    torch.testing.assert_close(fast.mlp_knockout_sweep(model, toks, mean_metric, mlp_means),
                               ref.mlp_knockout_sweep(model, toks, mean_metric, mlp_means), atol=ATOL, rtol=0)
    both = fast.head_knockout(means, heads).combine(fast.mlp_knockout(mlp_means, [1], wi["S2"]))
    circuit = fast.ablate_circuit(means, _circuit(3, 4, wi))
    for ablation in (both, circuit, None):  # full logits at every position (generic metrics)
        torch.testing.assert_close(fast.run_with_ablation(model, toks, ablation),
                                   ref.run_with_ablation(model, toks, ablation), atol=ATOL, rtol=0)
    if parts:
        assert len(passes) >= 2 and all(len(part) == 2 for part in passes)


def test_planted_model_matches_reference():
    """The planted model (circuit known by construction): F(C), F(C\\K) and F(M\\K) of its circuit."""
    from ioi.circuits import circuit_for_model
    from ioi.data import IOIDataset
    from ioi.models import load_model

    model = load_model("planted-ioi", device="cpu")
    circuit = circuit_for_model("planted-ioi")
    ioi = IOIDataset(N=8, seed=1, tokenizer=model.tokenizer)
    abc = ioi.abc_dataset()
    means = fast.compute_template_means(model, abc.toks, ioi.groups)
    positions = fast.circuit_positions(circuit, ioi.word_idx)
    clean = ce.CleanRun.build(model, ioi, memory_budget_mb=256)
    evaluator = clean.evaluator(means, circuit, ioi)
    metric = LogitDiff.from_dataset(ioi, per_prompt=True)
    heads = list(positions)
    sets = [frozenset(heads[:1]), frozenset(heads[1:3]), frozenset(heads[::2])]
    evaluator.prefetch(sets)
    torch.testing.assert_close(evaluator.f_circuit,
                               ref.evaluate_circuit(model, ioi.toks, metric, means, positions).double(),
                               atol=ATOL, rtol=0)
    for k in sets:
        for mode, got in (("all_positions", evaluator.without(k)), ("relevant_positions", evaluator.model_without(k))):
            want = ref.evaluate_circuit(model, ioi.toks, metric, means, positions, knockout=sorted(k),
                                        knockout_mode=mode).double()
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_bit_identical_between_runs():
    model = sharp_model("random-L2-H3-D8")
    batch = _Batch(6, True)
    means = fast.compute_template_means(model, batch.abc, batch.groups)
    circuit = _circuit(2, 3, batch.word_idx)
    sets = [frozenset({(1, 0)}), frozenset({(0, 2), (1, 1)}), frozenset({(1, 2), (1, 0)})]
    values = []
    for _ in range(2):
        evaluator = ce.CleanRun.build(model, batch, memory_budget_mb=64).evaluator(means, circuit, batch)
        evaluator.prefetch(sets[:1])
        evaluator.prefetch(sets[1:])
        values.append(torch.stack([evaluator.without(k) for k in sets] + [evaluator.model_without(k) for k in sets]))
    assert torch.equal(values[0], values[1])


def test_head_weight_blocks_equal_the_column_gather():
    """``_weights(layer, heads)``: the q columns, k|v columns (k block then v block), their biases
    and the W_O rows of ``heads``, gathered per d_head block, equal the per-column gather of the
    fused weights (unsorted and partial head sets)."""
    model = sharp_model("random-L2-H4-D16")
    engine = KnockoutEngine(model, torch.zeros(2, 5, dtype=torch.long))
    net = engine.net
    dh, hd = net.d_head, net.hd
    for layer, heads in ((0, [0, 1, 2, 3]), (1, [2]), (1, [3, 0])):
        heads = torch.tensor(heads)
        within = (heads[:, None] * dh + torch.arange(dh)[None, :]).reshape(-1)
        kv_cols = torch.cat([within + hd, within + 2 * hd])
        expected = (net.W_qkv[layer][:, within], net.b_qkv[layer][within], net.W_qkv[layer][:, kv_cols],
                    net.b_qkv[layer][kv_cols], net.W_O_flat[layer][within])
        for got, want in zip(engine._weights(layer, heads), expected):
            assert torch.equal(got, want)


def test_all_ablated_stream_shared_only_between_the_same_means():
    """Two circuits on the same means share one all-ablated run (its F(C) equals the reference's);
    other means get their own."""
    model = sharp_model("random-L2-H3-D8")
    batch = _Batch(5, False)
    means = fast.compute_template_means(model, batch.abc, batch.groups)
    clean = ce.CleanRun.build(model, batch, memory_budget_mb=64)
    full = _circuit(2, 3, batch.word_idx)
    small = {h: p for h, p in full.items() if h[0] == 1}
    first, second = clean.evaluator(means, full, batch), clean.evaluator(means, small, batch)
    assert first.engine.stream("ablated") is second.engine.stream("ablated")
    other = clean.evaluator(means * 0.5, small, batch)
    assert other.engine.stream("ablated") is not first.engine.stream("ablated")
    for evaluator, circuit, m in ((first, full, means), (second, small, means), (other, small, means * 0.5)):
        torch.testing.assert_close(evaluator.f_circuit, _reference(model, batch, m, circuit, [], "all_positions"),
                                   atol=ATOL, rtol=0)


def test_bad_input_is_named():
    model = sharp_model("random-L2-H3-D8")
    batch = _Batch(4, False)
    means = fast.compute_template_means(model, batch.abc, batch.groups)
    with pytest.raises(ValueError, match="per-prompt means"):
        KnockoutEngine(model, batch.toks, end=batch.word_idx["END"], io_ids=batch.io_token_ids,
                       s_ids=batch.s_token_ids, head_means=means[:2])
    engine = KnockoutEngine(model, batch.toks, end=batch.word_idx["END"], io_ids=batch.io_token_ids,
                            s_ids=batch.s_token_ids)
    with pytest.raises(ValueError, match="head_means"):
        engine.evaluate([KnockoutSpec(torch.zeros(4, engine.seq, 2, 3, dtype=torch.bool), "ablated")])
    with pytest.raises(ValueError, match="END"):
        KnockoutEngine(model, batch.toks, end=batch.word_idx["END"])


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    assert torch.get_num_threads() == 2  # restored after the parallel passes
    torch.set_num_threads(previous)


@pytest.mark.parametrize("mode", ["prompts", "chunks"])
def test_parallel_paths_match_reference_and_repeat_bit_identically(mode, two_threads):
    """On a CPU with 2 torch threads a pass runs on 2 worker threads (one torch thread each):
    ``prompts``: the prompts cut in 2 parts, each part's pass on its own worker (later passes resume
    from the earlier ones' parts); ``chunks``: a pass's chunks on the workers (a lone chunk is
    split). The values equal the hooked reference, a repeat is bit-identical, and the FLOP counts
    equal the serial path's."""
    model = sharp_model("random-L3-H4-D16")
    batch = _Batch(7, True)
    means = fast.compute_template_means(model, batch.abc, batch.groups)
    circuit = _circuit(3, 4, batch.word_idx)
    heads = list(circuit)
    sets = [frozenset({heads[0]}), frozenset({heads[2]}), frozenset({heads[1], heads[3]}),
            frozenset({heads[3]}), frozenset({heads[0], heads[4]})]
    values, flops = [], []
    for parallel in (True, True, False):
        clean = ce.CleanRun.build(model, batch, memory_budget_mb=64)
        clean.engine.parallel_chunks = parallel and mode == "chunks"
        clean.engine.parallel_prompts = parallel and mode == "prompts"
        evaluator = clean.evaluator(means, circuit, batch)
        assert evaluator.engine._workers() == (2 if parallel and mode == "chunks" else 1)
        assert len(evaluator.engine._prompt_parts()) == (2 if parallel and mode == "prompts" else 1)
        lone = [frozenset({heads[0]}), frozenset({heads[4]})]  # one window (from END): one chunk, split
        evaluator.prefetch(lone, kinds=("M",))
        evaluator.prefetch(sets)  # {heads[0], heads[4]} resumes from {heads[0]} (per part in "prompts")
        values.append(torch.stack([evaluator.without(k) for k in sets] + [evaluator.model_without(k) for k in sets]))
        flops.append(dataclasses.astuple(evaluator.engine.flops))  # mlp qkv attn_out attention unembed streams evaluated passes
        if parallel and mode == "prompts":
            assert set(evaluator._runs[("M", lone[0])].parts) == set(evaluator.engine._prompt_parts())
    assert torch.equal(values[0], values[1])
    # same MLP, unembedding and stream FLOPs and spec count (smaller parallel chunks may project
    # fewer heads: a chunk computes the heads kept somewhere in it)
    parallel_flops, serial_flops = flops[0], flops[2]
    assert [parallel_flops[i] for i in (0, 4, 5, 6)] == pytest.approx([serial_flops[i] for i in (0, 4, 5, 6)])
    assert sum(parallel_flops[:6]) <= sum(serial_flops[:6]) * (1 + 1e-9)
    expected = torch.stack([_reference(model, batch, means, circuit, k, "all_positions") for k in sets]
                           + [_reference(model, batch, means, circuit, k, "relevant_positions") for k in sets])
    torch.testing.assert_close(values[0], expected, atol=ATOL, rtol=0)
    # float32 rounding (the parts' matmuls have other row counts): a few ulps of the logits through
    # three layers (up to 1.6e-6 at a logit difference of 0.54 with MKL's AVX2 kernels, AMD EPYC)
    torch.testing.assert_close(values[0], values[2], atol=1e-5, rtol=1e-5)


def test_prompt_parts_resume_from_serial_runs_and_back(two_threads):
    """Runs made on all prompts at once are bases for prompt parts (views of their captured rows)
    and runs made in parts are ignored as bases by a serial pass (or by other parts): the values
    stay exact and the parts resume where they can."""
    model = sharp_model("random-L3-H4-D16")
    batch = _Batch(7, False)
    means = fast.compute_template_means(model, batch.abc, batch.groups)
    circuit = _circuit(3, 4, batch.word_idx)
    ld = {"end": batch.word_idx["END"], "io_ids": batch.io_token_ids, "s_ids": batch.s_token_ids}
    engine = KnockoutEngine(model, batch.toks, head_means=means, memory_budget_mb=64, **ld)
    keep = fast.circuit_keep_mask(circuit, 7, engine.seq, 3, 4)

    def without(mask, *heads):
        mask = mask.clone()
        for layer, head in heads:
            mask[:, :, layer, head] = False
        return mask

    engine.parallel_prompts = False
    serial = engine.evaluate([KnockoutSpec(without(keep, (0, 2)), "ablated", capture=True)])[0]
    engine.parallel_prompts = True
    assert len(engine._prompt_parts()) == 2
    parted = engine.evaluate([KnockoutSpec(without(keep, (0, 2), (1, 1)), "ablated", capture=True)], bases=[serial])[0]
    assert parted.parts is not None and all(p.start == 1 and p.base is not None for p in parted.parts.values())
    engine.parallel_prompts = False
    last = engine.evaluate([KnockoutSpec(without(keep, (0, 2), (1, 1), (2, 0)), "ablated")], bases=[parted])[0]
    assert last.base is None  # the parts' run cannot be resumed from here
    knocked = [[(0, 2)], [(0, 2), (1, 1)], [(0, 2), (1, 1), (2, 0)]]
    want = torch.stack([_reference(model, batch, means, circuit, k, "all_positions") for k in knocked])
    torch.testing.assert_close(torch.stack([serial.ld, parted.ld, last.ld]), want, atol=ATOL, rtol=0)




def test_prompt_parts_balance_the_rows_up_to_end():
    """The cut between two parts is the one with the smaller larger part (not the first prefix past
    half: rows 3, 4, 4, 3, 2 cut after 2 prompts, 7 | 9, not after 3, 11 | 5); every part is
    non-empty; the engine's cuts follow its prompts' rows up to END."""
    assert balanced_cuts([3, 4, 4, 3, 2], 2) == [(0, 2), (2, 5)]
    assert balanced_cuts([1, 1, 1, 1, 1, 1, 1], 3) == [(0, 2), (2, 5), (5, 7)]
    assert balanced_cuts([1, 1, 100], 3) == [(0, 1), (1, 2), (2, 3)]
    assert balanced_cuts([3], 2) == [(0, 1)]
    assert balanced_cuts([15, 19, 15, 20, 15, 15, 19, 15], 2) == [(0, 4), (4, 8)]  # 69 | 64
    model = sharp_model("random-L2-H3-D8")
    batch = _Batch(9, True)
    engine = KnockoutEngine(model, batch.toks, end=batch.word_idx["END"], io_ids=batch.io_token_ids,
                            s_ids=batch.s_token_ids)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert engine._prompt_parts() == balanced_cuts((batch.word_idx["END"] + 1).tolist(), 2)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("spec", SHAPES)
@pytest.mark.parametrize(("bos", "ld_mode"), [(False, True), (True, False)])  # each of BOS and LD, on and off
def test_window_queries_equal_the_full_query_layout(spec, bos, ld_mode, monkeypatch):
    """Clean-source chunks attend only the query rows they need (a padded window per prompt with an
    explicit causal bias; END rows only in the last layer in LD mode): the same values as the
    full-query layout (every row attended by the fused causal kernel) for windows from END, from S2,
    from S1+1 and from position 0 (no source rows at all), a resumed spec, and all-ablated-source
    specs in the same passes; LD mode and full logits; fewer attention FLOPs counted."""
    model = sharp_model(spec)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    batch = _Batch(7, bos)
    wi = batch.word_idx
    means = fast.compute_template_means(model, batch.abc, batch.groups)
    circuit = _circuit(L, H, wi)
    ld = {"end": wi["END"], "io_ids": batch.io_token_ids, "s_ids": batch.s_token_ids} if ld_mode else {}
    outputs, attention = [], []
    for window in (True, False):
        monkeypatch.setattr(KnockoutEngine, "WINDOW_QUERIES", window)
        engine = KnockoutEngine(model, batch.toks, head_means=means, memory_budget_mb=64, **ld)
        N, S = engine.n, engine.seq
        rows = torch.arange(N)

        def clean(*knockouts):  # every head kept except (layer, head) at positions (None: everywhere)
            keep = torch.ones(N, S, L, H, dtype=torch.bool)
            for (layer, head), positions in knockouts:
                if positions is None:
                    keep[:, :, layer, head] = False
                else:
                    keep[rows, positions, layer, head] = False
            return KnockoutSpec(keep, "clean", capture=True)

        circuit_keep = fast.circuit_keep_mask(circuit, N, S, L, H)
        no_head = circuit_keep.clone()
        no_head[:, :, L - 1, 0] = False
        specs = [clean(((L - 1, 0), wi["END"])), clean(((1, 1), wi["S2"]), ((L - 1, 1), wi["END"])),
                 clean(((0, 2), wi["S1+1"])), clean(((1, 0), None)), KnockoutSpec(circuit_keep, "ablated"),
                 KnockoutSpec(no_head, "ablated")]
        runs = engine.evaluate(specs)
        more = clean(((0, 2), wi["S1+1"]), ((L - 1, H - 1), None))  # resumes from specs[2] at L - 1
        resumed = engine.evaluate([more], bases=[runs[2]])[0]
        assert resumed.base is runs[2] and resumed.start == L - 1
        runs.append(resumed)
        outputs.append(torch.stack([run.ld if ld_mode else run.logits for run in runs]))
        attention.append(engine.flops.attention)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-6)
    assert attention[0] < attention[1]
