"""Edge-level circuits: the graph, exact edge patching, attribution (EAP, EAP-IG) and discovery.

* :mod:`ioi.edges.graph`: :class:`Edge`, :class:`EdgeGraph`, :class:`Circuit` (JSON save/load);
* :mod:`ioi.edges.patching`: :func:`patch_edges` (many edge sets per batched pass, exact);
* :mod:`ioi.edges.attribution`: :func:`eap_scores`, :func:`eap_ig_scores`, :func:`eap_and_eap_ig_scores` (both, shared runs);
* :mod:`ioi.edges.discovery`: :func:`acdc`, :func:`top_n`, :func:`threshold`, :func:`rollup_to_heads`;
* :mod:`ioi.edges.reference`: :func:`patch_edges_reference` (hooks on the bridge, one set a pass).
"""

from ioi.edges.attribution import eap_and_eap_ig_scores, eap_ig_scores, eap_scores
from ioi.edges.discovery import acdc, rollup_to_heads, threshold, top_n
from ioi.edges.graph import POSITION_LABELS, Circuit, Edge, EdgeGraph
from ioi.edges.patching import mean_sender_outputs, patch_edges, sender_outputs
from ioi.edges.reference import patch_edges_reference

__all__ = [
    "POSITION_LABELS",
    "Circuit",
    "Edge",
    "EdgeGraph",
    "acdc",
    "eap_and_eap_ig_scores",
    "eap_ig_scores",
    "eap_scores",
    "mean_sender_outputs",
    "patch_edges",
    "patch_edges_reference",
    "rollup_to_heads",
    "sender_outputs",
    "threshold",
    "top_n",
]
