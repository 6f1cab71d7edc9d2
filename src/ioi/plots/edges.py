"""Figures of edge-level circuits (issue 12), from :mod:`ioi.experiments.edges` (``edge_circuits``).

* :func:`edges_roc`: ROC curves of every method's edge ranking against the edges known by
  construction (recomputed from ``data.csv`` with :func:`ioi.edges.scoring.roc_curve`); ACDC's
  circuit is one point. Without ground truth (GPT-2) the panel says so.
* :func:`edges_faithfulness`: faithfulness (LD recovered) against the number of edges kept, for
  the EAP and EAP-IG rankings, with every found circuit as a marker.
* :func:`edges_graph_acdc` / :func:`edges_graph_eap_ig`: a found circuit drawn like the paper's
  Fig. 2: heads by layer, coloured by the class the model's hand-found circuit gives them; an
  arrow per edge, its style naming the receiver's input (query, key, value; logits, MLP).
"""

from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from ioi.plots.common import CLASS_COLOURS, model_suptitle, num, paper_panel

METHOD_STYLE = {
    "eap": dict(color="#1f77b4", label="EAP"),
    "eap_ig": dict(color="#d62728", label="EAP-IG"),
    "acdc": dict(color="black", label="ACDC (exact patching)"),
}
INPUT_STYLE = {
    "q": dict(color="#1b9e77", ls="-", label="query"),
    "k": dict(color="#7570b3", ls="--", label="key"),
    "v": dict(color="#d95f02", ls=":", label="value"),
    "direct": dict(color="#444444", ls="-", label="MLP / logits input"),
}
NO_TRUTH_TEXT = (
    "No ground truth for this model: an ROC curve needs a circuit known edge by edge, which only "
    "the planted-circuit model has (ioi.planted.circuit_edges). The paper's circuit (Fig. 2) is a "
    "set of heads found by hand, not an edge set; the head overlap of each found circuit with it "
    "is in summary.json (circuits.*.overlap) and in the graph figures."
)


def _method_label(name: str, summary: Mapping, key: str = "auc") -> str:
    label = METHOD_STYLE[name]["label"]
    value = summary.get(key, {}).get(name)
    return label if value is None else f"{label} (AUC {value:.3f})"


def edges_roc(frame, summary, meta):
    """ROC curve of each method's edge ranking against the planted edges."""
    from ioi.edges.scoring import roc_curve

    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    if "truth" not in frame.columns:
        ax.axis("off")
        paper_panel(ax_text, NO_TRUTH_TEXT, heading="ROC not defined")
        model_suptitle(fig, "Edge rankings against the true circuit", meta)
        return fig
    labels = frame["truth"].to_numpy().astype(bool)
    for name in ("eap", "eap_ig"):
        curve = roc_curve(frame[name].to_numpy(), labels)
        ax.plot(curve.fpr, curve.tpr, lw=1.6, drawstyle="default",
                **{**METHOD_STYLE[name], "label": _method_label(name, summary)})
    ran_acdc = "acdc_n_edges" in summary
    if ran_acdc:
        found = frame["acdc"].to_numpy() == 1
        tpr, fpr = (found & labels).sum() / labels.sum(), (found & ~labels).sum() / (~labels).sum()
        ax.scatter([fpr], [tpr], s=60, zorder=5, marker="*", color="black",
                   label=f"ACDC circuit ({int(found.sum())} edges; AUC {summary['auc']['acdc']:.3f})")
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate (non-planted edges ranked above)")
    ax.set_ylabel("true positive rate (planted edges recovered)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    inset = ax.inset_axes([0.45, 0.32, 0.5, 0.4])
    for name in ("eap", "eap_ig"):
        curve = roc_curve(frame[name].to_numpy(), labels)
        inset.plot(curve.fpr, curve.tpr, lw=1.2, color=METHOD_STYLE[name]["color"])
    if ran_acdc:
        inset.scatter([fpr], [tpr], s=30, marker="*", color="black")
    inset.set_xlim(0, 0.05)
    inset.set_ylim(0.5, 1.01)
    inset.set_title("FPR <= 0.05", fontsize=7)
    inset.tick_params(labelsize=6)
    prec = summary.get("precision_at_k", {})
    pos = summary.get("auc_positions", {})
    text = (
        f"Ground truth: the {summary.get('n_true_edges')} planted edges of {summary['n_edges']} "
        f"(ioi.planted.CIRCUIT_EDGES, derived from the weights). Edges ranked by |score| "
        f"(EAP; EAP-IG with {summary['eap_ig_steps']} steps; p_ABC into p_IOI, metric = mean LD, "
        f"N = {summary['n_prompts']}). Precision at the true size: "
        + ", ".join(f"{METHOD_STYLE[k]['label'].split(' ')[0]} {v:.2f}" for k, v in prec.items())
        + ". " + (_acdc_text(summary) if ran_acdc else summary["acdc_status"] + ".")
    )
    if pos:
        text += (f"\nPer-position graph ({summary.get('n_edges_positions')} edges): AUC EAP "
                 f"{pos['eap']:.3f}, EAP-IG {pos['eap_ig']:.3f}.")
    paper_panel(ax_text, text, heading="Scoring against the planted circuit")
    model_suptitle(fig, "Edge-level circuit discovery: ROC against the planted edges", meta)
    return fig


def _acdc_text(summary: Mapping) -> str:
    return (f"ACDC: exact edge patching, tau = {num(summary['tau'])} (1% of the clean LD); found "
            f"{summary['acdc_n_edges']} edges, recall {summary['acdc_recall']:.2f}, precision "
            f"{summary['acdc_precision']:.2f}; missed: {', '.join(summary['acdc_missed']) or 'none'}; "
            f"extra: {', '.join(summary['acdc_extra']) or 'none'}.")


def edges_faithfulness(frame, summary, meta):
    """Faithfulness against edges kept, per ranking, with each found circuit marked."""
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(10.5, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    curves = summary["faithfulness_curves"]
    for name, curve in curves.items():
        k = np.asarray(curve["k"], dtype=float)
        keep = k > 0
        area = summary["faithfulness_area"][name]["linear"]
        ax.plot(k[keep], np.asarray(curve["faithfulness"])[keep], marker="o", ms=3, lw=1.4,
                color=METHOD_STYLE[name]["color"],
                label=f"{METHOD_STYLE[name]['label']} top-k (CPR {area['cpr']:.3f}, CMD {area['cmd']:.3f})")
    markers = {"acdc": "*", "eap_top_n": "s", "eap_ig_top_n": "D", "eap_threshold": "v", "eap_ig_threshold": "^"}
    for name, circuit in summary["circuits"].items():
        if circuit["n_edges"] == 0:
            continue
        colour = METHOD_STYLE["eap_ig" if name.startswith("eap_ig") else name.split("_")[0]]["color"]
        ax.scatter([circuit["n_edges"]], [circuit["faithfulness"]], marker=markers.get(name, "o"), s=55,
                   color=colour, edgecolor="black", zorder=5, label=f"{name} ({circuit['n_edges']} edges)")
    if summary.get("n_true_edges"):
        ax.axvline(summary["n_true_edges"], color="#999999", ls="--", lw=0.8, label="true circuit size")
    ax.axhline(1.0, color="#999999", lw=0.6)
    ax.axhline(0.0, color="#999999", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("edges kept clean (every other edge patched from p_ABC)")
    ax.set_ylabel("faithfulness (LD - LD_empty) / (LD_clean - LD_empty)")
    ax.legend(fontsize=6.5, loc="best")
    text = (
        f"Each point: the top-k edges by |score| kept clean, every other edge of the "
        f"{summary['n_edges']}-edge graph carries its p_ABC value (exact edge patching, one "
        f"batched pass). LD_clean = {summary['clean_logit_diff']:.3f}, LD_empty = "
        f"{summary['corrupted_logit_diff']:.3f}. k at MIB's fractions of the edges "
        "(0.1% ... 100%); CPR = area under the curve over the fraction kept, CMD = area of "
        "|1 - faithfulness| (linear x, MIB's default). EAP-IG (Hanna et al. 2024) and MIB report "
        "these areas for IOI on GPT-2 small; no number is compared here."
    )
    paper_panel(ax_text, text, heading="Faithfulness curve")
    model_suptitle(fig, "Faithfulness of edge rankings and found circuits", meta)
    return fig


def _head_classes(meta: Mapping) -> dict[tuple[int, int], str]:
    from ioi.circuits import circuit_for_model

    spec = str(meta.get("model", {}).get("spec", ""))
    circuit = circuit_for_model(spec)
    return {tuple(h): cls for cls in circuit.class_names() for h in circuit.classes[cls]}


def _node_xy(node: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    if node == "embed":
        return (n_heads - 1) / 2, -1.0
    if node == "logits":
        return (n_heads - 1) / 2, float(n_layers)
    if node.startswith("m"):
        return n_heads + 0.2, int(node[1:]) + 0.45
    layer, _, head = node[1:].partition(".h")
    return float(head), float(layer)


def draw_edge_circuit(edges: list[str], summary: Mapping, meta: Mapping, title: str, *, note: str = ""):
    """A circuit's edges drawn by layer (y) and head (x), heads coloured by their class."""
    from ioi.edges.graph import Edge

    n_layers, n_heads = int(summary["n_layers"]), int(summary["n_heads"])
    classes = _head_classes(meta)
    parsed = [Edge.parse(e) for e in edges]
    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(11, max(4.0, 0.42 * n_layers + 2.6)),
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    nodes: set[str] = set()
    for edge in parsed:
        receiver = edge.receiver if edge.receiver in ("logits",) or edge.receiver.startswith("m") \
            else edge.receiver.rsplit(".", 1)[0]
        part = edge.receiver.rsplit(".", 1)[1] if receiver != edge.receiver else "direct"
        nodes |= {edge.sender, receiver}
        (x0, y0), (x1, y1) = _node_xy(edge.sender, n_layers, n_heads), _node_xy(receiver, n_layers, n_heads)
        style = INPUT_STYLE[part]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color=style["color"], ls=style["ls"], lw=1.0,
                                    alpha=0.75, shrinkA=7, shrinkB=7, connectionstyle="arc3,rad=0.12"))
    for node in sorted(nodes):  # a set of str: its order changes with every process (hash seed)
        x, y = _node_xy(node, n_layers, n_heads)
        if node in ("embed", "logits"):
            ax.scatter([x], [y], s=420, marker="s", color="#dddddd", edgecolor="black", zorder=4)
            ax.text(x, y, node, ha="center", va="center", fontsize=7, zorder=5)
            continue
        if node.startswith("m"):
            ax.scatter([x], [y], s=160, marker="s", color="#bbbbbb", edgecolor="black", zorder=4)
            ax.text(x, y, node.upper().replace("M", "MLP"), ha="center", va="center", fontsize=5, zorder=5)
            continue
        layer, _, head = node[1:].partition(".h")
        cls = classes.get((int(layer), int(head)))
        ax.scatter([x], [y], s=300, color=CLASS_COLOURS.get(cls, CLASS_COLOURS["other"]) if cls else "white",
                   edgecolor="black", zorder=4)
        ax.text(x, y, f"{layer}.{head}", ha="center", va="center", fontsize=6, zorder=5,
                color="white" if cls else "black")
    ax.set_xlim(-0.8, n_heads + 0.8)
    ax.set_ylim(-1.7, n_layers + 0.7)
    ax.set_yticks(range(n_layers))
    ax.set_ylabel("layer")
    ax.set_xlabel("head")
    ax.set_xticks(range(n_heads))
    handles = [Line2D([0], [0], color=s["color"], ls=s["ls"], label=s["label"]) for s in INPUT_STYLE.values()]
    present = sorted({c for c in classes.values()}, key=list(CLASS_COLOURS).index)
    handles += [Line2D([0], [0], marker="o", ls="", markerfacecolor=CLASS_COLOURS[c], markeredgecolor="black",
                       label=c) for c in present]
    handles += [Line2D([0], [0], marker="o", ls="", markerfacecolor="white", markeredgecolor="black",
                       label="not in the hand-found circuit")]
    paper_panel(ax_text, note, heading="What is drawn")
    ax_text.legend(handles=handles, fontsize=6.5, loc="lower left", ncol=2, frameon=False)
    model_suptitle(fig, title, meta)
    return fig


def _graph_note(name: str, summary: Mapping) -> str:
    circuit = summary["circuits"][name]
    overlap = circuit["overlap"]
    text = (
        f"{circuit['n_edges']} edges, faithfulness {circuit['faithfulness']:.3f} (keep mode, p_ABC "
        f"elsewhere). Heads: {circuit['heads_text']}. Of the {overlap['n_reference']} heads of the "
        f"{summary['reference_circuit']} circuit, {overlap['n_shared']} are in it (missed: "
        f"{', '.join(overlap['missed_heads']) or 'none'}; extra: {', '.join(overlap['extra_heads']) or 'none'})."
        " Class recall: " + ", ".join(f"{c} {r:.2f}" for c, r in circuit["class_recall"].items()) + "."
    )
    if "confusion" in circuit:
        c = circuit["confusion"]
        text += (f"\nAgainst the planted edges: {c['tp']} of {c['n_true']} found, {c['fp']} extra"
                 f"{' (exactly the planted circuit)' if c['exact'] else ''}.")
    text += ("\nPaper Fig. 2: the IOI circuit of GPT-2 small as head classes joined by the paths "
             "path patching found (name movers fed by S-inhibition heads via queries, those by "
             "induction / duplicate-token heads via keys and values, induction by previous-token "
             "heads).")
    return text


def edges_graph_acdc(frame, summary, meta):
    """The ACDC circuit (exact patching) drawn like the paper's Fig. 2; where ACDC was not run
    (config ``acdc``), the figure says why instead of drawing an empty circuit."""
    if "acdc" not in summary["circuits"]:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.axis("off")
        paper_panel(ax, summary["acdc_status"] + ".", heading="ACDC not run")
        model_suptitle(fig, "ACDC circuit: not run", meta)
        return fig
    return draw_edge_circuit(summary["circuits"]["acdc"]["edges"], summary, meta,
                             f"ACDC circuit (exact edge patching, tau = {num(summary['tau'])})",
                             note=_graph_note("acdc", summary))


def edges_graph_eap_ig(frame, summary, meta):
    """The EAP-IG top-n circuit drawn like the paper's Fig. 2."""
    return draw_edge_circuit(summary["circuits"]["eap_ig_top_n"]["edges"], summary, meta,
                             f"EAP-IG top-{summary['n_top']} circuit",
                             note=_graph_note("eap_ig_top_n", summary))
