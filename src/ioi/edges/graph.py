"""The computational graph of edges between model components, and circuits (edge sets) over it.

Nodes (the ACDC / EAP / AutoCircuit graph at head granularity with separate q/k/v inputs):

* **senders** (what writes into the residual stream): ``"embed"`` (token + position embedding),
  ``"a{L}.h{H}"`` (head ``H`` of layer ``L``: its ``z @ W_O[H]``, TransformerLens' ``hook_result``,
  without the layer's shared ``b_O``) and ``"m{L}"`` (MLP ``L``'s output);
* **receivers** (what reads the residual stream): ``"a{L}.h{H}.q"``, ``"a{L}.h{H}.k"``,
  ``"a{L}.h{H}.v"`` (the inputs of that head's query, key and value projections, before ``ln1``),
  ``"m{L}"`` (the MLP's input, before ``ln2``) and ``"logits"`` (the final residual stream, before
  ``ln_final``).

An edge ``sender -> receiver`` exists when the sender writes before the receiver reads: heads of
layer ``L`` read ``embed``, every head and MLP of layers ``< L``; MLP ``L`` reads those and the
heads of layer ``L``; the logits read every sender. GPT-2 small (12 x 12) has 32,491 such edges
(ACDC's count). A graph built with ``positions`` (labels of ``ioi.data`` word positions: ``IO``,
``S1``, ``S1+1``, ``S2``, ``END``, plus our ``"other"`` = every position not named by the other
labels of the graph) has one edge per (sender, receiver, position label); the edge then carries a
difference only at that token position of each prompt.

Edge names: ``"sender->receiver"``, or ``"sender->receiver@POSITION"``, e.g.
``"a9.h9->logits@END"``, ``"embed->a0.h1.k"``, ``"a3.h0->a5.h5.v@S2"``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

POSITION_LABELS: tuple[str, ...] = ("IO", "S1", "S1+1", "S2", "END", "other")
"""Position labels an edge may carry (``"other"``: every position no other label of the graph names)."""

_SENDER_RE = re.compile(r"^(?:embed|a(\d+)\.h(\d+)|m(\d+))$")
_RECEIVER_RE = re.compile(r"^(?:logits|a(\d+)\.h(\d+)\.([qkv])|m(\d+))$")
VALID_FORMS = (
    "edge names are 'SENDER->RECEIVER' or 'SENDER->RECEIVER@POSITION' with SENDER one of 'embed', "
    "'a{L}.h{H}', 'm{L}'; RECEIVER one of 'a{L}.h{H}.q', 'a{L}.h{H}.k', 'a{L}.h{H}.v', 'm{L}', "
    f"'logits'; POSITION one of {', '.join(POSITION_LABELS)} (e.g. 'a9.h9->logits@END')"
)


def _sender_time(name: str) -> tuple[int, int]:
    """When a sender writes: embed (-1, 0); head of layer L (L, 0); MLP L (L, 1)."""
    match = _SENDER_RE.match(name)
    if match is None:
        raise ValueError(f"Unknown sender {name!r}: {VALID_FORMS}.")
    if name == "embed":
        return (-1, 0)
    if match.group(1) is not None:
        return (int(match.group(1)), 0)
    return (int(match.group(3)), 1)


def _receiver_time(name: str) -> tuple[int, int]:
    """When a receiver reads: head inputs of layer L (L, 0); MLP L (L, 1); logits (inf)."""
    match = _RECEIVER_RE.match(name)
    if match is None:
        raise ValueError(f"Unknown receiver {name!r}: {VALID_FORMS}.")
    if name == "logits":
        return (1 << 30, 0)
    if match.group(1) is not None:
        return (int(match.group(1)), 0)
    return (int(match.group(4)), 1)


@dataclasses.dataclass(frozen=True)
class Edge:
    """``sender -> receiver`` at ``position`` (a label of :data:`POSITION_LABELS`; None = all)."""

    sender: str
    receiver: str
    position: str | None = None

    def __post_init__(self) -> None:
        send, receive = _sender_time(self.sender), _receiver_time(self.receiver)
        if self.position is not None and self.position not in POSITION_LABELS:
            raise ValueError(f"Unknown position {self.position!r} in edge {self.name!r}: {VALID_FORMS}.")
        if not send < receive:
            raise ValueError(
                f"Edge {self.name!r}: the receiver {self.receiver!r} reads before the sender "
                f"{self.sender!r} writes (a head of layer L reads only senders of layers < L; MLP L "
                "also reads the heads of layer L). Reverse it or pick a later receiver."
            )

    @property
    def name(self) -> str:
        base = f"{self.sender}->{self.receiver}"
        return base if self.position is None else f"{base}@{self.position}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: "str | Edge") -> "Edge":
        """``Edge`` from its name (``"a0.h1->a2.h3.q@S2"``); an ``Edge`` is returned as is."""
        if isinstance(name, Edge):
            return name
        if not isinstance(name, str) or name.count("->") != 1:
            raise ValueError(f"Cannot parse edge {name!r}: {VALID_FORMS}.")
        sender, rest = name.split("->")
        receiver, _, position = rest.partition("@")
        if "@" in rest and not position:
            raise ValueError(f"Cannot parse edge {name!r} (empty position): {VALID_FORMS}.")
        return cls(sender.strip(), receiver.strip(), position.strip() or None)


def _senders(n_layers: int, n_heads: int, attn_only: bool) -> list[str]:
    names = ["embed"]
    for layer in range(n_layers):
        names += [f"a{layer}.h{head}" for head in range(n_heads)]
        if not attn_only:
            names.append(f"m{layer}")
    return names


def _receivers(n_layers: int, n_heads: int, attn_only: bool) -> list[str]:
    names = []
    for layer in range(n_layers):
        names += [f"a{layer}.h{head}.{part}" for head in range(n_heads) for part in "qkv"]
        if not attn_only:
            names.append(f"m{layer}")
    names.append("logits")
    return names


class EdgeGraph:
    """All edges of a model's graph, in topological order of receivers (then senders, positions).

    ``senders`` / ``receivers`` list the node names in topological order; ``edges[i]`` is edge
    ``i`` (the index every score tensor uses); ``slots`` are the position slots (``(None,)`` for a
    graph without positions, else the position labels). ``receiver_index[i]``,
    ``sender_index[i]``, ``slot_index[i]`` locate edge ``i`` in a dense
    ``[n_slots, n_receivers, n_senders]`` mask (:meth:`dense_masks`).
    """

    def __init__(self, n_layers: int, n_heads: int, *, attn_only: bool = False,
                 positions: Sequence[str] | None = None):
        if n_layers < 1 or n_heads < 1:
            raise ValueError(f"A graph needs n_layers >= 1 and n_heads >= 1, got {n_layers}, {n_heads}.")
        self.n_layers, self.n_heads, self.attn_only = int(n_layers), int(n_heads), bool(attn_only)
        if positions is not None:
            positions = tuple(positions)
            unknown = [p for p in positions if p not in POSITION_LABELS]
            if unknown or not positions or len(set(positions)) != len(positions):
                raise ValueError(
                    f"positions must be distinct labels from {POSITION_LABELS}, got {positions!r}."
                )
        self.positions: tuple[str, ...] | None = positions
        self.slots: tuple[str | None, ...] = (None,) if positions is None else positions
        self.senders = _senders(self.n_layers, self.n_heads, self.attn_only)
        self.receivers = _receivers(self.n_layers, self.n_heads, self.attn_only)
        self._sender_pos = {name: i for i, name in enumerate(self.senders)}
        self._receiver_pos = {name: i for i, name in enumerate(self.receivers)}
        sender_times = [_sender_time(s) for s in self.senders]
        edges, r_idx, s_idx, p_idx = [], [], [], []
        self.n_senders_of: list[int] = []  # receiver -> number of senders before it (a prefix)
        for r, receiver in enumerate(self.receivers):
            t = _receiver_time(receiver)
            n_before = sum(1 for st in sender_times if st < t)
            self.n_senders_of.append(n_before)
            for s in range(n_before):
                for p, slot in enumerate(self.slots):
                    edges.append(Edge(self.senders[s], receiver, slot))
                    r_idx.append(r)
                    s_idx.append(s)
                    p_idx.append(p)
        self.edges: list[Edge] = edges
        self._index = {edge: i for i, edge in enumerate(edges)}
        self.receiver_index = torch.tensor(r_idx, dtype=torch.long, device="cpu")
        self.sender_index = torch.tensor(s_idx, dtype=torch.long, device="cpu")
        self.slot_index = torch.tensor(p_idx, dtype=torch.long, device="cpu")

    @classmethod
    def from_model(cls, model=None, positions: Sequence[str] | None = None, *, n_layers: int | None = None,
                   n_heads: int | None = None, attn_only: bool | None = None) -> "EdgeGraph":
        """The graph of a model (a bridge, or anything with ``.cfg.n_layers/n_heads``), or of a
        shape given by ``n_layers`` / ``n_heads``."""
        if model is not None:
            cfg = model.cfg
            n_layers, n_heads = cfg.n_layers, cfg.n_heads
            attn_only = bool(getattr(cfg, "attn_only", False)) if attn_only is None else attn_only
        if n_layers is None or n_heads is None:
            raise ValueError("EdgeGraph.from_model needs a model or both n_layers and n_heads.")
        return cls(n_layers, n_heads, attn_only=bool(attn_only), positions=positions)

    # -- lookup ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.edges)

    def __iter__(self):
        return iter(self.edges)

    def __contains__(self, edge) -> bool:
        try:
            return Edge.parse(edge) in self._index
        except ValueError:
            return False

    def __repr__(self) -> str:
        pos = "" if self.positions is None else f", positions={self.positions}"
        return f"EdgeGraph(n_layers={self.n_layers}, n_heads={self.n_heads}{pos}: {len(self)} edges)"

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @property
    def names(self) -> list[str]:
        return [edge.name for edge in self.edges]

    def index(self, edge: "Edge | str") -> int:
        """Index of ``edge`` (an :class:`Edge` or its name); a clear error when not in the graph."""
        edge = Edge.parse(edge)
        found = self._index.get(edge)
        if found is not None:
            return found
        if edge.sender not in self._sender_pos:
            raise ValueError(f"Edge {edge.name!r}: sender {edge.sender!r} is not in {self!r} "
                             f"(senders: embed, a0.h0 .. a{self.n_layers - 1}.h{self.n_heads - 1}"
                             f"{'' if self.attn_only else f', m0 .. m{self.n_layers - 1}'}).")
        if edge.receiver not in self._receiver_pos:
            raise ValueError(f"Edge {edge.name!r}: receiver {edge.receiver!r} is not in {self!r}.")
        if self.positions is None:
            raise ValueError(f"Edge {edge.name!r} has a position but {self!r} has none: drop "
                             f"'@{edge.position}' or build the graph with positions=(...).")
        raise ValueError(f"Edge {edge.name!r}: {self!r} has edges at positions {self.positions} "
                         "only: give each edge one of them ('@END', ...).")

    def indices(self, edges: Iterable["Edge | str"]) -> Tensor:
        return torch.tensor([self.index(e) for e in edges], dtype=torch.long, device="cpu")

    def sender_of(self, name: str) -> int:
        return self._sender_pos[name]

    def receiver_of(self, name: str) -> int:
        return self._receiver_pos[name]

    # -- edge sets as masks ---------------------------------------------------------------------

    def edge_mask(self, edge_sets) -> Tensor:
        """``BoolTensor[n_sets, n_edges]`` from a list of edge sets (each a :class:`Circuit`, an
        iterable of :class:`Edge` / names, or a ``BoolTensor[n_edges]``), a single :class:`Circuit`,
        or a ``BoolTensor[n_sets, n_edges]``."""
        if isinstance(edge_sets, Tensor):
            mask = edge_sets.bool()
            if mask.ndim == 1:
                mask = mask[None]
            if mask.ndim != 2 or mask.shape[1] != len(self):
                raise ValueError(f"An edge mask must be [n_sets, {len(self)}], got {tuple(edge_sets.shape)}.")
            return mask.cpu()
        if isinstance(edge_sets, Circuit):
            edge_sets = [edge_sets]
        edge_sets = list(edge_sets)
        if edge_sets and isinstance(edge_sets[0], (str, Edge)):
            raise ValueError("edge_sets is a list of edge SETS: wrap a single set in a list ([edges]).")
        mask = torch.zeros(len(edge_sets), len(self), dtype=torch.bool, device="cpu")
        for k, edge_set in enumerate(edge_sets):
            if isinstance(edge_set, Tensor):
                mask[k] = self.edge_mask(edge_set)[0]
                continue
            edges = edge_set.edges if isinstance(edge_set, Circuit) else edge_set
            idx = [self.index(e) for e in edges]
            if idx:
                mask[k, idx] = True
        return mask

    def dense_masks(self, edge_mask: Tensor) -> Tensor:
        """``[n_sets, n_slots, n_receivers, n_senders]`` float masks of a ``[n_sets, n_edges]`` mask
        (on the CPU, as the graph's indices: the engine reads a mask's structure on the host)."""
        n_sets = edge_mask.shape[0]
        edge_mask = edge_mask.cpu()
        dense = torch.zeros(n_sets, self.n_slots, len(self.receivers), len(self.senders), device="cpu")
        flat = dense.view(n_sets, -1)
        cell = (self.slot_index * len(self.receivers) + self.receiver_index) * len(self.senders) + self.sender_index
        flat[:, cell] = edge_mask.to(flat.dtype)
        return dense

    def scores_to_dense(self, scores: Tensor) -> Tensor:
        """Per-edge scores ``[n_edges]`` as ``[n_slots, n_receivers, n_senders]`` (0 off-graph)."""
        return self.dense_masks(scores.detach().float().cpu()[None])[0]

    def dense_to_scores(self, dense: Tensor) -> Tensor:
        """The inverse of :meth:`scores_to_dense` (``[..., n_slots, n_receivers, n_senders]``)."""
        flat = dense.reshape(*dense.shape[:-3], -1)
        cell = (self.slot_index * len(self.receivers) + self.receiver_index) * len(self.senders) + self.sender_index
        return flat[..., cell.to(flat.device)]


@dataclasses.dataclass
class Circuit:
    """A set of edges with (optional) per-edge scores, the method that found it and metadata."""

    edges: tuple[Edge, ...]
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    method: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.edges = tuple(Edge.parse(e) for e in self.edges)
        if len(set(self.edges)) != len(self.edges):
            raise ValueError("A circuit lists an edge twice.")
        self.scores = {str(k): float(v) for k, v in self.scores.items()}

    def __len__(self) -> int:
        return len(self.edges)

    def __contains__(self, edge) -> bool:
        return Edge.parse(edge) in set(self.edges)

    @property
    def names(self) -> list[str]:
        return [edge.name for edge in self.edges]

    def require_nonempty(self, what: str = "this operation") -> "Circuit":
        if not self.edges:
            raise ValueError(f"The circuit ({self.method or 'no method'}) has no edges; {what} needs at "
                             "least one (lower the threshold / raise n).")
        return self

    def to_json(self, path: str | Path) -> None:
        from ioi.provenance import write_json

        write_json(path, {"method": self.method, "edges": self.names,
                          "scores": self.scores, "meta": self.meta})

    @classmethod
    def from_json(cls, path: str | Path) -> "Circuit":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "edges" not in data:
            raise ValueError(f"{path} is not a circuit JSON (needs 'edges', written by Circuit.to_json).")
        return cls(edges=tuple(Edge.parse(e) for e in data["edges"]), scores=data.get("scores", {}),
                   method=data.get("method", ""), meta=data.get("meta", {}))
