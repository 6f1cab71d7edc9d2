"""Scoring an edge ranking or a found circuit against a circuit whose edges are known.

Against ground truth (the planted model, :func:`ioi.planted.circuit_edges`):

* :func:`truth_labels`: one boolean per edge of an :class:`~ioi.edges.graph.EdgeGraph`, True for
  the ground-truth edges (an unknown truth edge is an error, not a silent miss).
* :func:`roc_curve` / :func:`roc_auc`: the ROC curve of a method's edge ranking (edges ordered by
  ``|score|``, the larger the more likely in the circuit, as EAP / EAP-IG / MIB rank them; or by
  the signed score with ``absolute=False``), one point per distinct score, ties forming one
  diagonal step. AUC is the Mann-Whitney statistic: the probability that a random true edge
  outranks a random other edge, ties counting 1/2 -- exactly the trapezoid area under that curve.
* :func:`precision_at_k`: the fraction of true edges among the ``k`` top-ranked edges (``k``
  defaults to the true circuit's size, where precision = recall), in expectation over a uniformly
  random order of the edges tied at the cut.

Against behaviour (any model):

* :func:`faithfulness_curve`: the metric with only the ``k`` top-ranked edges clean and every
  other edge corrupted (:func:`ioi.edges.patching.patch_edges`, ``mode="keep"``), for ``k`` at the
  MIB fractions of the graph's edges; normalised as MIB / EAP-IG's ``evaluate_area_under_curve``:
  ``f(k) = (m(C_k) - m(empty)) / (m(full) - m(empty))`` where ``m(full)`` is the clean model and
  ``m(empty)`` the model with every edge corrupted. :func:`normalised_area` gives the trapezoid
  area under ``f`` over the fraction of edges kept (MIB's CPR) and the area of ``|1 - f|`` (MIB's
  CMD), on a linear x axis as MIB's default (``log_scale=True`` for its log variant).

Against the paper's hand-found circuit (any model, e.g. GPT-2 small):

* :func:`head_overlap`: a found circuit rolled up to heads
  (:func:`ioi.edges.discovery.rollup_to_heads`) against the heads of an
  :class:`ioi.circuits.Circuit` (the paper's 26 by default): shared heads, precision, recall, and
  recall per head class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float

if TYPE_CHECKING:  # pragma: no cover
    from ioi.circuits import Circuit as HeadCircuit
    from ioi.edges.graph import Circuit, Edge, EdgeGraph

Head = tuple[int, int]

# The fractions of the graph's edges at which MIB evaluates a ranking's faithfulness
# (MIB_circuit_track evaluate_area_under_curve; EAP-IG's evaluation uses the same grid).
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


# ------------------------------------------------------------------------------------------------
# Labels and ranking
# ------------------------------------------------------------------------------------------------


def truth_labels(graph: "EdgeGraph", truth: Iterable["Edge | str"]) -> Bool[torch.Tensor, "n_edges"]:
    """``labels[i]`` is True where ``graph.edges[i]`` is a ground-truth edge.

    Every truth edge must be an edge of ``graph`` (same sender, receiver and position); a missing
    one raises a ValueError naming it (e.g. a position-free truth on a per-position graph)."""
    labels = torch.zeros(len(graph), dtype=torch.bool, device="cpu")
    missing = []
    for edge in truth:
        try:
            labels[graph.index(edge)] = True
        except ValueError as error:
            missing.append(f"{edge}: {error}")
    if missing:
        raise ValueError(
            f"{len(missing)} ground-truth edge(s) are not edges of this graph ({graph!r}); build "
            "the graph and the truth with the same positions (EdgeGraph.from_model(model, "
            "positions=...) and ioi.planted.circuit_edges(positions=...)). First: " + missing[0]
        )
    return labels


def _as_numpy(values, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=float).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what} is empty.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} has {int((~np.isfinite(array)).sum())} non-finite value(s); "
                         "score every edge with a finite number.")
    return array


def _inputs(scores, labels, absolute: bool) -> tuple[np.ndarray, np.ndarray]:
    s = _as_numpy(scores, "scores")
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels: score every edge of the graph once.")
    return (np.abs(s) if absolute else s), y


@dataclasses.dataclass(frozen=True)
class RocCurve:
    """``fpr[i], tpr[i]``: the rates when every edge with rank score >= ``thresholds[i]`` is called
    positive (``thresholds[0] = +inf``: nothing called)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    n_positive: int
    n_negative: int


def roc_curve(scores, labels, *, absolute: bool = True) -> RocCurve:
    """ROC curve of ranking edges by ``|scores|`` (or ``scores``) against boolean ``labels``.

    One point per distinct score (tied edges enter together: one diagonal segment), from (0, 0)
    to (1, 1). Needs at least one true and one other edge."""
    s, y = _inputs(scores, labels, absolute)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both classes: {n_pos} true and {n_neg} other edges.")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each group of equal scores
    distinct = np.flatnonzero(np.diff(s_sorted) != 0)
    ends = np.concatenate([distinct, [s.size - 1]])
    tp = np.cumsum(y_sorted)[ends]
    fp = (ends + 1) - tp
    tpr = np.concatenate([[0.0], tp / n_pos])
    fpr = np.concatenate([[0.0], fp / n_neg])
    thresholds = np.concatenate([[np.inf], s_sorted[ends]])
    auc = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2.0))
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=auc, n_positive=n_pos, n_negative=n_neg)


def roc_auc(scores, labels, *, absolute: bool = True) -> float:
    """Area under :func:`roc_curve`: P(random true edge outranks random other edge), ties 1/2.

    Computed from average ranks (the Mann-Whitney U statistic), which equals the trapezoid area."""
    s, y = _inputs(scores, labels, absolute)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes: {n_pos} true and {n_neg} other edges.")
    ranks = _average_ranks(s)  # 1 = smallest
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (ascending), tied values sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=float)
    start = 0
    boundaries = np.concatenate([np.flatnonzero(np.diff(sorted_values) != 0) + 1, [values.size]])
    for stop in boundaries:
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0
        start = stop
    return ranks


def precision_at_k(scores, labels, k: int | None = None, *, absolute: bool = True) -> float:
    """Fraction of true edges among the ``k`` top-ranked edges (``k`` = number of true edges by
    default). Edges tied at the cut count in proportion: with ``t`` tied edges of which ``p`` are
    true competing for the last ``r`` places, they add ``r * p / t`` (the expectation over a random
    order of the ties)."""
    s, y = _inputs(scores, labels, absolute)
    k = int(y.sum()) if k is None else int(k)
    if not 1 <= k <= s.size:
        raise ValueError(f"k = {k} must be between 1 and the number of edges ({s.size}).")
    kth = np.sort(s)[::-1][k - 1]
    above = s > kth
    tied = s == kth
    places = k - int(above.sum())
    hits = float(y[above].sum()) + places * float(y[tied].sum()) / float(tied.sum())
    return hits / k


def top_k_order(scores, *, absolute: bool = True) -> np.ndarray:
    """Edge indices from the highest to the lowest rank score; ties in graph (topological) order."""
    s = _as_numpy(scores, "scores")
    return np.argsort(-(np.abs(s) if absolute else s), kind="stable")


def circuit_labels(circuit: "Circuit", graph: "EdgeGraph") -> np.ndarray:
    """A found circuit as a 0/1 score per graph edge (for ROC points / precision of a circuit)."""
    return truth_labels(graph, circuit.edges).numpy().astype(float)


def circuit_confusion(circuit: "Circuit", graph: "EdgeGraph", truth: Iterable["Edge | str"]) -> dict[str, Any]:
    """True/false positives/negatives of a found circuit's edge set against the truth, with
    precision, recall (= TPR), FPR, and the missed / extra edge names."""
    found = truth_labels(graph, circuit.edges).numpy()
    truth_mask = truth_labels(graph, truth).numpy()
    tp = int((found & truth_mask).sum())
    fp = int((found & ~truth_mask).sum())
    fn = int((~found & truth_mask).sum())
    tn = int((~found & ~truth_mask).sum())
    names = [e.name for e in graph.edges]
    return {
        "n_found": int(found.sum()),
        "n_true": int(truth_mask.sum()),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "fpr": fp / (fp + tn) if fp + tn else float("nan"),
        "exact": fp == 0 and fn == 0,
        "missed": [names[i] for i in np.flatnonzero(~found & truth_mask)],
        "extra": [names[i] for i in np.flatnonzero(found & ~truth_mask)],
    }


# ------------------------------------------------------------------------------------------------
# Faithfulness curve
# ------------------------------------------------------------------------------------------------


def edge_counts(n_edges: int, fractions: Sequence[float] = MIB_FRACTIONS,
                extra: Iterable[int] = ()) -> list[int]:
    """``int(fraction * n_edges)`` for each fraction (MIB's rounding), plus ``extra`` counts and 0,
    sorted and without repeats."""
    counts = {0} | {int(f * n_edges) for f in fractions} | {int(k) for k in extra}
    bad = [k for k in counts if not 0 <= k <= n_edges]
    if bad:
        raise ValueError(f"edge counts {sorted(bad)} outside [0, {n_edges}].")
    return sorted(counts)


@dataclasses.dataclass(frozen=True)
class FaithfulnessCurve:
    """The metric with the ``k`` top-ranked edges kept clean, every other edge corrupted."""

    k: np.ndarray  # edges kept
    fraction: np.ndarray  # k / n_edges
    metric: np.ndarray  # m(C_k)
    faithfulness: np.ndarray  # (m(C_k) - m(empty)) / (m(full) - m(empty))
    clean: float  # m(full): the clean model
    corrupted: float  # m(empty): every edge corrupted
    n_edges: int

    def area(self, *, log_scale: bool = False) -> dict[str, float]:
        return normalised_area(self.fraction, self.faithfulness, log_scale=log_scale)

    def as_rows(self) -> list[dict[str, float]]:
        return [{"k": int(k), "fraction": float(f), "metric": float(m), "faithfulness": float(v)}
                for k, f, m, v in zip(self.k, self.fraction, self.metric, self.faithfulness)]


def normalise(metric, clean: float, corrupted: float) -> np.ndarray:
    """``(metric - corrupted) / (clean - corrupted)``: 1 = the clean model, 0 = all corrupted."""
    gap = clean - corrupted
    if abs(gap) < 1e-12:
        raise ValueError(f"clean ({clean:.4g}) and corrupted ({corrupted:.4g}) metrics are equal: "
                         "the faithfulness normalisation is undefined; pick a corruption that "
                         "changes the metric.")
    return (np.asarray(metric, dtype=float) - corrupted) / gap


def normalised_area(fractions, faithfulness, *, log_scale: bool = False,
                    x_min: float = MIB_FRACTIONS[0]) -> dict[str, float]:
    """MIB's areas by the trapezoid rule over the points with fraction >= ``x_min`` (MIB starts
    at 0.1% of the edges): ``cpr`` = area under ``f``, ``cmd`` = area under ``|1 - f|``, each also
    divided by the x range (``*_mean``: 1 for a perfect curve / 0 for CMD). ``log_scale`` uses
    ln(fraction) as x, as MIB's option."""
    x = np.asarray(fractions, dtype=float)
    f = np.asarray(faithfulness, dtype=float)
    keep = x >= x_min
    x, f = x[keep], f[keep]
    if x.size < 2:
        raise ValueError("the area needs at least two points at fractions >= x_min.")
    order = np.argsort(x, kind="stable")
    x, f = x[order], f[order]
    if log_scale:
        x = np.log(x)
    dx = np.diff(x)
    cpr = float(np.sum(dx * (f[1:] + f[:-1]) / 2.0))
    gap = np.abs(1.0 - f)
    cmd = float(np.sum(dx * (gap[1:] + gap[:-1]) / 2.0))
    width = float(x[-1] - x[0])
    return {"cpr": cpr, "cmd": cmd, "cpr_mean": cpr / width, "cmd_mean": cmd / width,
            "x_min": float(np.exp(x[0]) if log_scale else x[0]), "log_scale": bool(log_scale)}


def faithfulness_curve(
    model,
    clean_tokens,
    corrupted_tokens,
    metric,
    graph: "EdgeGraph",
    scores,
    *,
    counts: Sequence[int] | None = None,
    fractions: Sequence[float] = MIB_FRACTIONS,
    absolute: bool = True,
    word_idx=None,
    mean_activations=None,
    **patch_kwargs,
) -> FaithfulnessCurve:
    """Faithfulness of the top-``k`` edges of ``scores`` for each ``k`` in ``counts`` (default:
    :func:`edge_counts` at ``fractions``), every circuit evaluated by exact edge patching in keep
    mode (listed edges clean, all others from ``corrupted_tokens`` -- or the mean activations when
    ``corrupted_tokens`` is None), all circuits in one batched :func:`patch_edges` call (chunked
    to the memory budget there). ``m(full)`` is evaluated the same way with every edge kept and
    ``m(empty)`` with none, so the normalisation shares the engine's arithmetic."""
    from ioi.edges.patching import patch_edges

    counts, edge_sets = curve_edge_sets(graph, scores, counts=counts, fractions=fractions, absolute=absolute)
    values = patch_edges(model, clean_tokens, corrupted_tokens, edge_sets, metric, graph=graph,
                         word_idx=word_idx, mean_activations=mean_activations, mode="keep",
                         **patch_kwargs)
    return curve_from_values(counts, values, len(graph))


def curve_edge_sets(graph: "EdgeGraph", scores, *, counts: Sequence[int] | None = None,
                    fractions: Sequence[float] = MIB_FRACTIONS, absolute: bool = True) -> tuple[list[int], list]:
    """``(counts, edge sets)`` of :func:`faithfulness_curve`: the top-``k`` edges of ``scores`` for
    each ``k`` (0 and every edge included), to evaluate in keep mode (e.g. batched with other sets)."""
    n_edges = len(graph)
    if len(_as_numpy(scores, "scores")) != n_edges:
        raise ValueError(f"{len(_as_numpy(scores, 'scores'))} scores for a graph of {n_edges} edges.")
    counts = edge_counts(n_edges, fractions) if counts is None else sorted({int(k) for k in counts} | {0})
    if counts[-1] != n_edges:
        counts = counts + [n_edges]
    order = top_k_order(scores, absolute=absolute)
    edges = graph.edges
    return counts, [[edges[i] for i in order[:k]] for k in counts]


def curve_from_values(counts: Sequence[int], values, n_edges: int) -> FaithfulnessCurve:
    """The :class:`FaithfulnessCurve` of the keep-mode metric ``values`` of :func:`curve_edge_sets`."""
    values = np.asarray(values.detach().cpu().double() if isinstance(values, torch.Tensor) else values,
                        dtype=float)
    corrupted, clean = float(values[0]), float(values[-1])
    k = np.asarray(counts)
    return FaithfulnessCurve(k=k, fraction=k / n_edges, metric=values,
                             faithfulness=normalise(values, clean, corrupted), clean=clean,
                             corrupted=corrupted, n_edges=n_edges)


# ------------------------------------------------------------------------------------------------
# Head-level overlap with a hand-found circuit
# ------------------------------------------------------------------------------------------------


def _head_of(node) -> Head | None:
    """``(layer, head)`` of a head node given as ``"a{L}.h{H}"`` (optionally with ``.q/.k/.v``),
    ``(L, H)`` or ``"L.H"``; None for the embedding, MLPs and logits."""
    if isinstance(node, tuple) and len(node) == 2:
        return int(node[0]), int(node[1])
    text = str(node)
    if text.startswith("a") and ".h" in text:
        layer, _, rest = text[1:].partition(".h")
        return int(layer), int(rest.split(".")[0].split("@")[0])
    parts = text.split(".")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def found_heads(circuit) -> list[Head]:
    """The heads of a found circuit: for an edge :class:`~ioi.edges.graph.Circuit`, the head nodes
    of :func:`ioi.edges.discovery.rollup_to_heads` (every head that sends or receives, through its
    q, k or v, one of its edges; none for an empty circuit); or any iterable / mapping of head
    nodes (``"a9.h9"``, ``(9, 9)``, ``"9.9"``); sorted, without repeats."""
    from ioi.edges.graph import Circuit as EdgeCircuit

    if isinstance(circuit, EdgeCircuit):
        from ioi.edges.discovery import rollup_to_heads

        circuit = list(rollup_to_heads(circuit)) if len(circuit) else []
    if isinstance(circuit, Mapping):
        circuit = list(circuit.keys())
    heads = {_head_of(node) for node in circuit}
    heads.discard(None)
    return sorted(heads)


def head_overlap(circuit, reference: "HeadCircuit | None" = None) -> dict[str, Any]:
    """Overlap of a found circuit's heads with a hand-found circuit's (default: the paper's 26).

    Returns the found heads, the shared heads, precision (shared / found), recall (shared /
    reference), and per class of ``reference``: its heads, the found ones and the recall. Heads
    are ``"layer.head"`` strings (the summary convention)."""
    from ioi.circuits import PAPER_CIRCUIT

    reference = PAPER_CIRCUIT if reference is None else reference
    found = found_heads(circuit)
    ref_heads = [tuple(h) for h in reference.heads()]
    key = lambda h: f"{h[0]}.{h[1]}"  # noqa: E731
    shared = sorted(set(found) & set(ref_heads))
    by_class = {}
    for cls in reference.class_names():
        heads = [tuple(h) for h in reference.classes[cls]]
        hit = [h for h in heads if h in set(found)]
        by_class[cls] = {"heads": [key(h) for h in heads], "found": [key(h) for h in hit],
                         "recall": len(hit) / len(heads) if heads else float("nan")}
    return {
        "reference": reference.name,
        "found_heads": [key(h) for h in found],
        "shared_heads": [key(h) for h in shared],
        "extra_heads": [key(h) for h in found if h not in set(ref_heads)],
        "missed_heads": [key(h) for h in ref_heads if h not in set(found)],
        "n_found": len(found),
        "n_reference": len(ref_heads),
        "n_shared": len(shared),
        "precision": len(shared) / len(found) if found else float("nan"),
        "recall": len(shared) / len(ref_heads) if ref_heads else float("nan"),
        "by_class": by_class,
    }


def finite_or_none(value: float) -> float | None:
    """JSON-safe float (NaN/inf -> None)."""
    value = float(value)
    return value if math.isfinite(value) else None
