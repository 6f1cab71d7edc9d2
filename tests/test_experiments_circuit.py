"""Circuit evaluation (faithfulness, completeness, minimality), token/position signals and
adversarial examples (ioi.experiments.circuit_eval / .signals, ioi.plots.circuit_eval / .signals),
end to end on a tiny random GPT-2 with a small circuit holding every class: result files, the
summary keys paper_reference.yaml reads, invariants against the reference knockout code in
ioi.ablation, the adversarial token surgery, PNG + PDF figures and the Snakemake DAG.

Search counts (random / greedy sets, extra dataset seeds) are reduced here for speed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ioi.ablation import circuit_positions, compute_template_means, evaluate_circuit
from ioi.circuits import Circuit, PAPER_CIRCUIT, NAIVE_CIRCUIT, PAPER_GREEDY_SETS
from ioi.comparison import NOT_RUN, evaluate_claim, lookup
from ioi.data import IOIDataset
from ioi.experiments import circuit_eval as ce
from ioi.experiments import signals as sg
from ioi.experiments.core import RunContext, run_and_write
from ioi.metrics import LogitDiff
from ioi.models import load_model
from ioi.plots.common import save_figure
from ioi.registry import EXPERIMENTS, FIGURES, figures_of, resolve

ROOT = Path(__file__).resolve().parents[1]
SPEC = "random-L4-H2-D8"
N = 10

TINY_CIRCUIT = Circuit(
    name="tiny",
    classes={
        "name mover": ((3, 0),),
        "backup name mover": ((3, 1),),
        "negative name mover": ((2, 1),),
        "s-inhibition": ((2, 0), (1, 1)),
        "induction": ((1, 0),),
        "duplicate token": ((0, 1),),
        "previous token": ((0, 0),),
    },
)

OUR_EXPERIMENTS = ("faithfulness", "completeness", "minimality", "signals", "adversarial")
OUR_FIGURES = ("faithfulness", "fig6_completeness", "fig7_minimality", "fig20_minimality_table",
               "fig9_signals_table", "fig10_nm_attention", "fig8_adversarial_table")
COLUMNS = {
    "faithfulness": {"prompt", "template", "F_M", "F_C", "F_C_naive", "dataset_seed", "main"},
    "completeness": {"circuit", "kind", "label", "heads", "size", "x", "y", "incompleteness"},
    "minimality": {"layer", "head", "class", "K", "K_union_v", "F_C_without_K_and_v", "F_C_without_K", "score",
                   "score_fraction", "paper_F_C_without_K_and_v", "paper_F_C_without_K"},
    "signals": {"prompt", "template", "cell", "token_signal", "position_signal", "logit_diff",
                "nm_end_to_io", "nm_end_to_s1", "nm_end_to_s2"},
    "adversarial": {"prompt", "template", "variant", "sentence", "text", "end", "logit_diff", "io_prob",
                    "s_over_io"},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared, busy CPU: one thread is many times faster than several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_model(SPEC, device="cpu", seed=0)


@pytest.fixture(scope="module")
def datasets():
    ioi = IOIDataset(N=N, seed=0)
    return {"ioi": ioi, "abc": ioi.abc_dataset()}


def _context(datasets, names, circuit=TINY_CIRCUIT):
    return RunContext(datasets={k: datasets[k] for k in names}, circuit=circuit, seed=0, n=N,
                      memory_budget_mb=64, progress=False)


@pytest.fixture(scope="module")
def results(model, datasets, tmp_path_factory):
    """Every experiment run once through run_and_write (as the workflow does), reduced counts."""
    root = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ce, "N_RANDOM_SETS", 4)
        mp.setattr(ce, "GREEDY_RUNS", 1)
        mp.setattr(ce, "GREEDY_ITERATIONS", 3)
        mp.setattr(ce, "N_EXTRA_SEEDS", 1)
        for name in OUR_EXPERIMENTS:
            spec = EXPERIMENTS[name]
            run_and_write(resolve(spec.runner), model, _context(datasets, spec.datasets),
                          root / name, experiment_name=name)
    return root


def _read(root: Path, name: str):
    folder = root / name
    return (pd.read_csv(folder / "data.csv"), json.loads((folder / "summary.json").read_text()),
            json.loads((folder / "meta.json").read_text()))


def _reference_means(model, datasets):
    return compute_template_means(model, datasets["abc"].toks, datasets["ioi"].groups)


# ------------------------------------------------------------------------------------------------
# Registry and claims
# ------------------------------------------------------------------------------------------------


def test_registered():
    for name in OUR_EXPERIMENTS:
        assert name in EXPERIMENTS and callable(resolve(EXPERIMENTS[name].runner))
        assert figures_of(name), name
    assert {EXPERIMENTS[n].n_key for n in ("faithfulness", "completeness", "minimality")} == {"knockout"}
    assert EXPERIMENTS["signals"].n_key == "patching" and EXPERIMENTS["adversarial"].n_key == "adversarial"
    for name in OUR_FIGURES:
        spec = FIGURES[name]
        assert spec.experiment in OUR_EXPERIMENTS and callable(resolve(spec.plotter))
        assert spec.caption and spec.category == "Section 4"


def test_claims_read_our_results(results):
    """Every claim on these experiments finds its key and evaluates (PASS/FAIL), never NOT RUN."""
    claims = [c for c in yaml.safe_load((ROOT / "paper_reference.yaml").read_text())["claims"]
              if c["source"]["experiment"] in OUR_EXPERIMENTS]
    assert {c["source"]["experiment"] for c in claims} == set(OUR_EXPERIMENTS)
    for claim in claims:
        if claim.get("needs") == "paper_circuit":  # e.g. the Fig. 22 sets: checked below
            continue
        _, summary, _ = _read(results, claim["source"]["experiment"])
        assert lookup(summary, claim["source"]["key"]) is not None, claim["id"]
        outcome = evaluate_claim(claim, results)
        assert outcome.status != NOT_RUN, (claim["id"], outcome.reason)


@pytest.mark.parametrize("name", OUR_EXPERIMENTS)
def test_result_files(results, name):
    frame, summary, meta = _read(results, name)
    assert COLUMNS[name] <= set(frame.columns), set(frame.columns)
    assert len(frame) > 0
    assert meta["model"]["spec"] == SPEC and meta["experiment"] == name
    for key in ("logit_diff", "F_M", "F_C", "x", "y", "score"):
        if key in frame:
            assert np.isfinite(frame[key].to_numpy(float)).all(), key


# ------------------------------------------------------------------------------------------------
# Knockout invariants
# ------------------------------------------------------------------------------------------------


def test_evaluator_matches_reference_knockouts(model, datasets):
    """The fast evaluator (stop at the unembedding, resume from cached layers) equals
    ioi.ablation.evaluate_circuit for F(C), F(C\\K) and F(M\\K)."""
    ioi = datasets["ioi"]
    means = _reference_means(model, datasets)
    clean = ce.CleanRun.build(model, ioi, memory_budget_mb=64)
    assert clean.engine.ld_mode
    evaluator = clean.evaluator(means, TINY_CIRCUIT, ioi)
    metric = LogitDiff.from_dataset(ioi, per_prompt=True)
    positions = circuit_positions(TINY_CIRCUIT, ioi.word_idx)
    f_m = metric(model(ioi.toks)).double()
    torch.testing.assert_close(clean.f_model, f_m, atol=1e-5, rtol=0)
    f_c = evaluate_circuit(model, ioi.toks, metric, means, positions).double()
    torch.testing.assert_close(evaluator.f_circuit, f_c, atol=1e-5, rtol=0)
    for k in ([(2, 1)], [(1, 1), (3, 0)], [(0, 0), (2, 0), (3, 1)]):
        x = evaluate_circuit(model, ioi.toks, metric, means, positions, knockout=k,
                             knockout_mode="all_positions").double()
        y = evaluate_circuit(model, ioi.toks, metric, means, positions, knockout=k,
                             knockout_mode="relevant_positions").double()
        torch.testing.assert_close(evaluator.without(k), x, atol=1e-5, rtol=0)
        torch.testing.assert_close(evaluator.model_without(k), y, atol=1e-5, rtol=0)


def test_evaluator_spec_masks_are_the_definition(model, datasets):
    """F(C\\K)'s mask: the circuit's with K's heads ablated at every position; F(M\\K)'s: every head
    kept but K's at their circuit positions (built per head here; the evaluator broadcasts)."""
    ioi = datasets["ioi"]
    clean = ce.CleanRun.build(model, ioi, memory_budget_mb=64)
    evaluator = clean.evaluator(_reference_means(model, datasets), TINY_CIRCUIT, ioi)
    circuit_mask = evaluator._keep_circuit
    for k in ([(2, 1)], [(1, 1), (3, 0)], [(0, 0), (2, 0), (3, 1)]):
        want_c, want_m = circuit_mask.clone(), torch.ones_like(circuit_mask)
        for layer, head in k:
            want_c[:, :, layer, head] = False
            want_m[:, :, layer, head] = ~circuit_mask[:, :, layer, head]
        assert torch.equal(evaluator._spec("C", frozenset(k)).head_keep, want_c), k
        assert torch.equal(evaluator._spec("M", frozenset(k)).head_keep, want_m), k
    with pytest.raises(ValueError, match="not in the circuit"):
        evaluator._spec("M", frozenset([(0, 3)]))


def test_one_torch_thread_restores_the_count():
    from ioi._threads import one_torch_thread

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_torch_thread():
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_every_head_everywhere_is_the_model(model, datasets):
    """A 'circuit' of every head at every position ablates nothing: F(C) = F(M)."""
    ioi = datasets["ioi"]
    means = _reference_means(model, datasets)
    everything = {(l, h): None for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)}
    clean = ce.CleanRun.build(model, ioi, memory_budget_mb=64)
    evaluator = clean.evaluator(means, everything, ioi)
    torch.testing.assert_close(evaluator.f_circuit, clean.f_model, atol=1e-6, rtol=0)
    metric = LogitDiff.from_dataset(ioi, per_prompt=True)
    reference = evaluate_circuit(model, ioi.toks, metric, means, everything).double()
    torch.testing.assert_close(reference, clean.f_model, atol=1e-5, rtol=0)


def test_completeness_empty_set_is_faithfulness(results, model, datasets):
    _, completeness, _ = _read(results, "completeness")
    _, faithfulness, _ = _read(results, "faithfulness")
    frame, _, _ = _read(results, "completeness")
    empty = completeness["empty_full"]
    assert empty["x"] == pytest.approx(faithfulness["F_C"], abs=1e-6)
    assert empty["y"] == pytest.approx(faithfulness["F_M"], abs=1e-6)
    assert completeness["empty_naive"]["x"] == pytest.approx(faithfulness["F_C_naive"], abs=1e-6)
    ioi = datasets["ioi"]
    metric = LogitDiff.from_dataset(ioi)
    assert empty["y"] == pytest.approx(float(metric(model(ioi.toks))), abs=1e-5)
    # classes: "name mover" merges the backups; the naive circuit drops backups and negatives
    assert set(completeness["class_heads_full"]["name mover"]) == {"3.0", "3.1"}
    assert "negative name mover" in completeness["class_incompleteness_full"]
    assert "negative name mover" not in completeness["class_incompleteness_naive"]
    assert set(frame["kind"]) >= {"empty", "class", "random", "greedy"}
    greedy = frame[frame["kind"].isin(["greedy", "greedy_candidate"])]
    assert completeness["greedy_max_incompleteness_full"] == pytest.approx(
        greedy[greedy["circuit"] == "full"]["incompleteness"].max())
    np.testing.assert_allclose(frame["incompleteness"], (frame["x"] - frame["y"]).abs(), atol=1e-9)
    assert completeness["counts"]["random_sets"] == 4 and completeness["counts"]["greedy_runs"] == 1
    assert all(len(s["heads"]) >= 1 for s in completeness["greedy_sets"]["full"])


class _FakeEvaluator:
    """F(C\\K) = incompleteness(K), F(M\\K) = 0 for one prompt: the greedy rules on known values."""

    def __init__(self, table):
        self.table = {frozenset(k): v for k, v in table.items()}
        self.f_circuit = torch.tensor([self.table[frozenset()]], dtype=torch.float64)
        self.f_model = torch.zeros(1, dtype=torch.float64)

    def without(self, k):
        return torch.tensor([self.table[frozenset(k)]], dtype=torch.float64)

    def model_without(self, k):
        return torch.zeros(1, dtype=torch.float64)

    def prefetch(self, knockouts, kinds=("C", "M")):
        """The real evaluator batches these sets; here every value is a table lookup."""


A, B, C = (0, 0), (0, 1), (1, 0)


def _greedy_sets(table, rule, iterations=2):
    points = ce._greedy(_FakeEvaluator(table), [A, B, C], "full", np.random.default_rng(0),
                        candidates=3, iterations=iterations, run=0, rule=rule)
    return [(set(p.heads), p.incompleteness) for p in points if p.kind == "greedy"]


def test_greedy_paper_code_rule_adds_only_improvements_and_keeps_the_final_set():
    """The paper code's new_greedy_search: start from old = |F(C) - F(M)|; take the best sampled
    K ∪ {v} only if it beats old; one point per run, its final set. The printed Algorithm 3 always
    adds the best candidate and keeps every intermediate set."""
    none_better = {(): 1.0, (A,): 0.5, (B,): 0.8, (C,): 0.9, (A, C): 0.6, (B, C): 0.7}
    assert _greedy_sets(none_better, "paper_code") == [(set(), 1.0)]
    assert _greedy_sets(none_better, "algorithm3") == [({C}, 0.9), ({B, C}, 0.7)]
    one_better = {(): 1.0, (A,): 0.5, (B,): 0.8, (C,): 1.5, (A, C): 1.2, (B, C): 1.4}
    assert _greedy_sets(one_better, "paper_code") == [({C}, 1.5)]
    assert _greedy_sets(one_better, "algorithm3") == [({C}, 1.5), ({B, C}, 1.4)]
    with pytest.raises(ValueError, match="algorithm3"):
        ce._greedy(_FakeEvaluator(one_better), [A], "full", np.random.default_rng(0), 1, 1, 0, rule="x")
    assert ce.GREEDY_RULE == "paper_code" and ce.GREEDY_RUNS == 10


def test_fig22_sets_evaluated_as_given():
    table = {tuple(sorted(k)): float(i + 1) for i, k in enumerate(PAPER_GREEDY_SETS)}
    table[()] = 0.0
    points = ce.fig22_points(_FakeEvaluator(table), PAPER_CIRCUIT, "full")
    assert [frozenset(p.heads) for p in points] == list(PAPER_GREEDY_SETS)
    assert [p.incompleteness for p in points] == [1.0, 2.0, 3.0, 4.0]
    assert ce.fig22_points(_FakeEvaluator(table), TINY_CIRCUIT, "full") == []


def test_fig22_claim_reads_the_fig22_key():
    claims = {c["id"]: c for c in yaml.safe_load((ROOT / "paper_reference.yaml").read_text())["claims"]}
    claim = claims["fig22_greedy_sets_incompleteness"]
    assert claim["source"] == {"experiment": "completeness", "key": "fig22_max_incompleteness_full"}
    assert claim["needs"] == "paper_circuit"


def test_completeness_records_the_greedy_rule(results):
    frame, summary, meta = _read(results, "completeness")
    assert summary["greedy_rule"] == "paper_code" and "paper code" in meta["greedy"]
    finals = frame[(frame["kind"] == "greedy") & (frame["circuit"] == "full")]
    assert len(finals) == summary["counts"]["greedy_runs"]  # one final set per run
    assert "fig22_max_incompleteness_full" not in summary  # not the paper circuit


def test_minimality_empty_k(results, model, datasets):
    """For a head whose K is empty (the first name mover), score = |F(C\\{v}) - F(C)|."""
    frame, summary, _ = _read(results, "minimality")
    row = frame[(frame["layer"] == 3) & (frame["head"] == 0)].iloc[0]
    assert row["K"] == "{}" and row["K_union_v"] == "{3.0}"
    ioi = datasets["ioi"]
    means = _reference_means(model, datasets)
    metric = LogitDiff.from_dataset(ioi)
    positions = circuit_positions(TINY_CIRCUIT, ioi.word_idx)
    f_c = float(evaluate_circuit(model, ioi.toks, metric, means, positions))
    f_cv = float(evaluate_circuit(model, ioi.toks, metric, means, positions, knockout=[(3, 0)]))
    assert summary["score"]["3.0"] == pytest.approx(abs(f_cv - f_c), abs=1e-5)
    assert summary["min_score_fraction"] == pytest.approx(min(summary["score_fraction"].values()))
    assert set(summary["score"]) == {f"{l}.{h}" for l, h in TINY_CIRCUIT.heads()}
    assert summary["k_sets"]["3.1"] == []  # backup: its own class, no other member


def test_faithfulness_summary(results):
    frame, summary, _ = _read(results, "faithfulness")
    main = frame[frame["main"]]
    assert len(main) == N and len(frame) == 2 * N  # base dataset + 1 extra seed here
    assert summary["faithfulness_ratio"] == pytest.approx(main["F_C"].mean() / main["F_M"].mean())
    assert summary["faithfulness_gap"] == pytest.approx(abs(main["F_M"].mean() - main["F_C"].mean()))
    assert summary["naive_minus_full_gap_abs"] == pytest.approx(
        abs(summary["faithfulness_gap_naive"] - summary["faithfulness_gap"]))
    assert len(summary["faithfulness_ratio_seeds"]) == 2
    assert summary["faithfulness_ratio_seed_std"] == pytest.approx(np.std(summary["faithfulness_ratio_seeds"], ddof=1))
    assert sorted(summary["by_template"]) == sorted(set(main["template"]))
    assert summary["naive_circuit"]["classes"].keys() == {"name mover", "s-inhibition", "induction",
                                                          "duplicate token", "previous token"}


def test_naive_circuit_of_the_paper():
    assert ce.naive_circuit_for(PAPER_CIRCUIT) is NAIVE_CIRCUIT
    merged = ce.knockout_classes(PAPER_CIRCUIT)["name mover"]
    assert len(merged) == 11 and "backup name mover" not in ce.knockout_classes(PAPER_CIRCUIT)


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------


def test_signals_baseline_cell_is_clean(results, model, datasets):
    frame, summary, _ = _read(results, "signals")
    ioi = datasets["ioi"]
    clean = float(LogitDiff.from_dataset(ioi)(model(ioi.toks)))
    assert summary["cells"]["orig_tok_orig_pos"] == pytest.approx(clean, abs=1e-5)
    assert summary["clean_logit_diff_mean"] == pytest.approx(clean, abs=1e-5)
    assert summary["orig_orig_minus_clean_max_abs"] < 1e-5
    assert set(summary["cells"]) == set(sg.SIGNAL_CELLS) == set(summary["cell_ci"])
    assert set(summary["nm_attention"]) == {"clean", "rand_tok_orig_pos", "inv_tok_inv_pos"}
    assert summary["patched_heads"] == ["2.0", "1.1"]
    # other cells do change something
    assert any(abs(summary["cells"][c] - clean) > 1e-7 for c in summary["cells"] if c != "orig_tok_orig_pos")


def test_signal_datasets_carry_the_right_signals(datasets):
    """S2's token: S / random / IO; it matches the name at S1's (original) or IO's (inverted) slot."""
    ioi = datasets["ioi"]
    rows = torch.arange(N)
    s2, io_pos, s1_pos = (ioi.word_idx[k] for k in ("S2", "IO", "S1"))
    for cell, dataset in sg.signal_datasets(ioi).items():
        _, s_tok, s_pos = sg.SIGNAL_CELLS[cell]
        toks = dataset.toks
        s2_tok = toks[rows, s2]
        same_as = toks[rows, s1_pos] if s_pos == 1 else toks[rows, io_pos]
        other = toks[rows, io_pos] if s_pos == 1 else toks[rows, s1_pos]
        assert torch.equal(s2_tok, same_as) and not (s2_tok == other).any(), cell
        if s_tok == 1:
            assert torch.equal(s2_tok, ioi.s_token_ids), cell
        elif s_tok == -1:
            assert torch.equal(s2_tok, ioi.io_token_ids), cell
        else:
            assert not (s2_tok == ioi.s_token_ids).any() and not (s2_tok == ioi.io_token_ids).any(), cell
        assert torch.equal(dataset.word_idx["END"], ioi.word_idx["END"])


def test_signal_fit_recovers_linear_cells():
    cells = {c: 2.0 * p + 0.5 * t for c, (_, t, p) in sg.SIGNAL_CELLS.items()}
    fit = sg.fit_signals(cells)
    assert fit["fit_position_coefficient"] == pytest.approx(2.0)
    assert fit["fit_token_coefficient"] == pytest.approx(0.5)
    assert fit["fit_mean_relative_error"] == pytest.approx(0.0, abs=1e-12)
    paper = sg.fit_signals(sg.PAPER_FIG9)  # the paper's own cells give its 2.31 / 0.99
    assert paper["fit_position_coefficient"] == pytest.approx(2.31, abs=0.01)
    assert paper["fit_token_coefficient"] == pytest.approx(0.99, abs=0.01)


# ------------------------------------------------------------------------------------------------
# Adversarial examples
# ------------------------------------------------------------------------------------------------


def _expected_insertion(text: str, s_name: str) -> int:
    """Character index after the first clause's terminator: last '.' before S2, else last ','."""
    s2 = text.rindex(" " + s_name)
    head = text[:s2]
    cut = head.rfind(".")
    return (cut if cut >= 0 else head.rfind(",")) + 1


@pytest.mark.parametrize("name_of", ["io", "s"])
def test_adversarial_insertion(datasets, name_of):
    ioi = datasets["ioi"]
    sentences = [[sg.ADVERSARIAL_SENTENCES[i % 5]] for i in range(N)]
    built = sg.build_adversarial(ioi, sentences, name_of)
    tok = ioi.tokenizer
    for i, prompt in enumerate(ioi.prompts):
        name = prompt.io if name_of == "io" else prompt.s
        original = ioi.prompts_without_answer[i]
        sentence = sentences[i][0].replace("[A]", name)
        cut = _expected_insertion(original, prompt.s)
        expected = original[:cut] + sentence + original[cut:]
        end = int(built["end"][i])
        assert built["texts"][i] == expected
        assert tok.decode(built["toks"][i, : end + 1]) == expected
        assert int(built["toks"][i, end + 1]) == int(ioi.io_token_ids[i])  # the answer follows END
        assert tok.decode(built["toks"][i, end]) == tok.decode(ioi.toks[i, int(ioi.word_idx["END"][i])])
        assert tok.decode(built["toks"][i, int(built["s2"][i])]) == " " + prompt.s
        assert end == int(ioi.word_idx["END"][i]) + int(built["n_inserted"][i])
        assert re.search(r"[.,]" + re.escape(sentence), expected)


def test_adversarial_summary(results):
    frame, summary, meta = _read(results, "adversarial")
    assert meta["variant"] == "single" and summary["variant"] == "single"
    for variant in sg.VARIANTS:
        part = frame[frame["variant"] == variant]
        assert len(part) == N
        assert summary[variant]["logit_diff_mean"] == pytest.approx(part["logit_diff"].mean())
        assert summary[variant]["s_over_io_rate"] == pytest.approx((part["logit_diff"] < 0).mean())
        low, high = summary[variant]["logit_diff_mean_ci"]
        assert low <= summary[variant]["logit_diff_mean"] <= high
    io_rows = frame[frame["variant"] == "extra_io"]
    s_rows = frame[frame["variant"] == "extra_s"]
    assert list(io_rows["sentence"]) == list(s_rows["sentence"])  # same sentence, other name
    # Fig. 8 is compared with the paper code's final call: two sentences (DOUBLE_ADX_TEMPLATE).
    assert summary["fig8_variant"] == sg.FIG8_VARIANT == "double"
    for kind in ("extra_io", "extra_s"):
        fig8 = summary[f"fig8_{kind}"]
        assert fig8["variant"] == "double"
        assert fig8["logit_diff_mean"] == summary[f"{kind}_double"]["logit_diff_mean"]
        assert fig8["s_over_io_rate"] == summary[f"{kind}_double"]["s_over_io_rate"]
    double_rows = frame[frame["variant"] == "extra_io_double"]
    assert (double_rows["n_inserted"] > io_rows["n_inserted"].to_numpy()).all()


def test_adversarial_claims_compare_the_papers_variant():
    """Every Fig. 8 claim reads the fig8_* keys (the variant of the paper code's final call) and
    says so; the plot puts the paper's values beside the same rows."""
    from ioi.plots import signals as psg

    claims = yaml.safe_load((ROOT / "paper_reference.yaml").read_text())["claims"]
    advex = [c for c in claims if c["source"]["experiment"] == "adversarial"]
    assert advex
    for claim in advex:
        assert claim["source"]["key"].startswith("fig8_"), claim["id"]
        assert "two" in (claim["statement"] + claim["why"]).lower(), claim["id"]
    assert set(psg.FIG8_ROWS["double"]) == set(sg.FIG8_KEYS["double"].values())


# ------------------------------------------------------------------------------------------------
# Figures and workflow
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OUR_FIGURES)
def test_figure(results, tmp_path, name):
    spec = FIGURES[name]
    fig = resolve(spec.plotter)(*_read(results, spec.experiment))
    assert isinstance(fig, matplotlib.figure.Figure)
    title = fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title()
    assert SPEC in title
    png, pdf = tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"
    save_figure(fig, png, pdf)
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"


def test_paper_values_only_for_gpt2_shapes(results):
    from ioi.plots import circuit_eval as pce
    from ioi.plots import signals as psg

    _, summary, meta = _read(results, "completeness")
    assert "paper_points" not in summary  # tiny circuit, not the paper's
    assert not pce._paper_ok(summary, meta)
    assert pce._paper_ok({"n_layers": 12, "n_heads": 12}, {"model": {"spec": "gpt2-small"}})
    assert not pce._paper_ok({"n_layers": 12, "n_heads": 12}, {"model": {"spec": "planted-ioi"}})
    assert psg.PAPER_FIG9 == sg.PAPER_FIG9
    assert {k: v for k, v in psg.PAPER_FIG8.items()} == {
        k: (v["logit_diff_mean"], v["io_prob_mean"], v["s_over_io_rate"]) for k, v in sg.PAPER_FIG8.items()}
    assert ce.PAPER_COMPLETENESS_POINTS["full"]["none"] == (2.838, 3.302)
    assert set(ce.PAPER_FIG20) == {f"{l}.{h}" for l, h in PAPER_CIRCUIT.heads()}


def test_snakemake_dry_run_lists_the_figures(tiny_dry_run):
    listed = tiny_dry_run
    for name in OUR_FIGURES:
        assert f"figures/random-tiny/{name}.png" in listed, name
    for name in OUR_EXPERIMENTS:
        assert f"results/random-tiny/{name}/summary.json" in listed, name


def test_greedy_runs_come_from_the_config_else_the_papers_ten():
    """config greedy_runs -> RunContext.greedy_runs -> the search's run count (None: the paper's 10)."""
    from ioi.experiments import circuit_eval as ce
    from ioi.experiments.core import RunContext

    assert ce.greedy_runs(RunContext(datasets={}, circuit=None)) == ce.GREEDY_RUNS == 10
    assert ce.greedy_runs(RunContext(datasets={}, circuit=None, greedy_runs=2)) == 2
