"""Circuit discovery on the edge graph: ACDC-style pruning with exact edge patching, and top-n /
threshold selection from attribution scores; node-level roll-up of a found circuit.

ACDC (Conmy et al. 2023), as here
---------------------------------
Start from the full graph (nothing patched: the clean run). Visit the receivers in **reverse
topological order** (``logits``, then ``m{L-1}``, ``a{L-1}.h{H-1}.v``, ``.k``, ``.q``, ...,
``a0.h0.q``); for each, try its incoming edges one at a time, senders in reverse topological order
(latest first; a position graph's slots in graph order): patch the edge (it now carries
``corrupted - current`` on top of every edge removed so far), evaluate the metric exactly
(:func:`ioi.edges.patch_edges` semantics), and **remove the edge for good when the metric moved by
less than ``tau``**; otherwise restore it. The metric is

* ``criterion="abs_ld"`` (default): ``|metric(with edge removed) - metric(current)|`` with the
  given :class:`ioi.metrics.LogitDiff` (raw mean logit difference unless it is normalised: then
  ``tau`` is in those units);
* ``criterion="kl"`` (ACDC's choice for IOI): the increase of the mean KL divergence
  ``KL(clean model || current model)`` of the next-token distributions at each prompt's END.

As in ACDC, a node none of whose outgoing edges is left cannot affect the output, so its incoming
edges are removed without a test (their effect is exactly zero; skipped when ``tau = 0``, which with
ACDC's strict ``<`` keeps every edge).

Speed (same decisions as the sequential loop): a receiver's candidate sets differ only from its
own layer on, so each evaluation resumes the clean run there; and candidates are evaluated in
batches of *cumulative* removals (edge 1; edges 1-2; ...), which are exactly the states the
sequential loop would test as long as the edges keep being removed; at the first kept edge the
rest of the batch is discarded and re-evaluated from the new state.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ioi.edges._engine import slot_token_index
from ioi.edges.graph import Circuit, Edge, EdgeGraph
from ioi.edges.patching import _BYTES, _budget, edge_forward
from ioi.metrics import LogitDiff

__all__ = ["acdc", "rollup_to_heads", "threshold", "top_n"]

Criterion = Literal["abs_ld", "kl"]


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0 (an edge is removed when the metric moves by "
                         f"less than tau), got {tau!r}.")
    return tau


def _owner(receiver: str) -> str | None:
    """The sender node a receiver belongs to (``a3.h1.q`` -> ``a3.h1``); None for the logits."""
    if receiver == "logits":
        return None
    return receiver.rsplit(".", 1)[0] if receiver.startswith("a") else receiver


@torch.no_grad()
def acdc(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor | None,
    metric: LogitDiff,
    graph: EdgeGraph,
    tau: float,
    *,
    criterion: Criterion = "abs_ld",
    word_idx: dict | None = None,
    mean_activations: Tensor | None = None,
    max_batch: int = 32,
    memory_budget_mb: float | None = None,
    progress: bool = False,
) -> Circuit:
    """ACDC-style circuit discovery with exact edge patching (see the module docstring).

    Returns the kept edges as a :class:`Circuit` (``method="acdc"``); ``scores`` holds, for every
    kept edge, the metric change its removal would have caused (the tested value); ``meta`` the
    settings, counts, the clean / corrupted / final metric values and seconds.
    """
    tau = _check_tau(tau)
    if criterion not in ("abs_ld", "kl"):
        raise ValueError(f"criterion must be 'abs_ld' (|change of the metric|) or 'kl' (increase of KL from "
                         f"the clean model at END), got {criterion!r}.")
    if not isinstance(metric, LogitDiff) or metric.per_prompt:
        raise ValueError("acdc needs a scalar ioi.metrics.LogitDiff (it reads each prompt's END).")
    started = time.perf_counter()
    engine = edge_forward(model, graph)
    device = engine.device
    clean = torch.as_tensor(clean_tokens).long().to(device)
    n = clean.shape[0]
    if len(metric) != n:
        raise ValueError(f"The metric has {len(metric)} prompts, the tokens {n}.")
    if (corrupted_tokens is None) == (mean_activations is None):
        raise ValueError("Give exactly one of corrupted_tokens (patching) and mean_activations (mean ablation).")
    ends = metric.end_idx.to(device).long()
    P = int(ends.max()) + 1
    clean = clean[:, :P]
    if corrupted_tokens is not None:
        corrupted = torch.as_tensor(corrupted_tokens).long().to(device)
        if corrupted.shape[0] != n or corrupted.shape[1] < P:
            raise ValueError("corrupted_tokens must be position-aligned with clean_tokens.")
        target = engine.sender_outputs(corrupted[:, :P])
    else:
        target = mean_activations.to(device)[:, :, :P].expand(-1, n, -1, -1).contiguous()
    slots = slot_token_index(graph, word_idx, n, P, device)
    states = engine.clean_states(clean, target)
    rows = torch.arange(n, device=device)
    io_ids, s_ids = metric.io_ids.to(device), metric.s_ids.to(device)
    net = engine.net

    clean_logprobs = None
    if criterion == "kl":
        final, _ = engine.run(clean, torch.zeros(1, graph.n_slots, engine.n_receivers, engine.n_senders,
                                                 device=device), slots, start=states[(net.n_layers, "final")], end_pos=ends)
        clean_logprobs = net.logits(final[0, :, 0]).log_softmax(-1)

    def evaluate(dense: Tensor, start_key) -> Tensor:
        """The metric of each mask set ``dense`` (built on the CPU; moved to the model once)."""
        final, _ = engine.run(clean, dense.to(device), slots, target=target, start=states[start_key], end_pos=ends,
                              host_masks=dense)
        at_end = final[:, :, 0]  # [k, n, d]: the END rows
        if criterion == "abs_ld":
            io, s = net.answer_logits(at_end, io_ids, s_ids)
            return metric.reduce(io - s)
        logprobs = net.logits(at_end).log_softmax(-1)
        return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1).mean(-1)

    # per-set working memory of a resumed pass (differences from the start layer on, inputs)
    per_set = _BYTES * n * P * net.d_model * (engine.n_senders + 8 * net.n_heads + 8) + _BYTES * n * P * net.d_mlp
    if criterion == "kl":
        per_set += _BYTES * n * model.cfg.d_vocab * 2
    sets_cap = max(1, min(max_batch, int(_budget(memory_budget_mb, device) // per_set)))

    removed = torch.zeros(len(graph), dtype=torch.bool, device="cpu")
    # the removed edges as a mask, kept on the CPU (edited edge by edge; one copy to the model per pass)
    dense = torch.zeros(1, graph.n_slots, engine.n_receivers, engine.n_senders, device="cpu")
    slot_of, receiver_of, sender_of = (graph.slot_index.tolist(), graph.receiver_index.tolist(),
                                       graph.sender_index.tolist())
    kept_out = torch.bincount(graph.sender_index, minlength=engine.n_senders)  # outgoing edges left
    by_receiver: dict[int, list[int]] = {}
    for i in range(len(graph)):
        by_receiver.setdefault(receiver_of[i], []).append(i)
    start_of = {}
    for r, name in enumerate(graph.receivers):
        if name == "logits":
            start_of[r] = (net.n_layers, "final")
        elif name.startswith("m"):
            start_of[r] = (int(name[1:]), "mlp")
        else:
            start_of[r] = (int(name[1:].split(".")[0]), "attn")

    zero_state = torch.zeros_like(dense)
    current = float(evaluate(zero_state, (net.n_layers, "final"))[0])
    clean_value = current
    tested_change: dict[str, float] = {}
    n_tests = n_passes = n_skipped = 0
    batch = 4
    bar = tqdm(total=len(graph), disable=not progress, desc=f"ACDC tau={tau:g}")

    def remove(i: int) -> None:
        removed[i] = True
        dense[0, slot_of[i], receiver_of[i], sender_of[i]] = 1.0
        kept_out[sender_of[i]] -= 1

    for r in reversed(range(engine.n_receivers)):
        edges = sorted(by_receiver.get(r, []),
                       key=lambda i: (-sender_of[i], slot_of[i]))
        owner = _owner(graph.receivers[r])
        if tau > 0 and owner is not None and int(kept_out[graph.sender_of(owner)]) == 0:
            for i in edges:
                remove(i)
            n_skipped += len(edges)
            bar.update(len(edges))
            continue
        j = 0
        while j < len(edges):
            chunk = edges[j : j + min(batch, sets_cap)]
            sets = dense.expand(len(chunk), -1, -1, -1).clone()
            for c, i in enumerate(chunk):
                sets[c:, slot_of[i], receiver_of[i], sender_of[i]] = 1.0
            values = evaluate(sets, start_of[r]).tolist()
            n_passes += 1
            accepted_all = True
            for c, i in enumerate(chunk):
                n_tests += 1
                change = values[c] - current if criterion == "kl" else abs(values[c] - current)
                bar.update(1)
                if change < tau:
                    remove(i)
                    current = values[c]
                else:
                    tested_change[graph.edges[i].name] = float(change)
                    j += c + 1
                    accepted_all = False
                    batch = max(1, c + 1)
                    break
            if accepted_all:
                j += len(chunk)
                batch = min(2 * batch, max_batch)
    bar.close()
    kept = [graph.edges[i] for i in range(len(graph)) if not removed[i]]
    corrupted_value = float(evaluate(
        graph.dense_masks(torch.ones(1, len(graph), dtype=torch.bool, device="cpu")), (0, "attn"))[0])
    meta = {
        "tau": tau, "criterion": criterion, "n_edges_graph": len(graph), "n_edges_kept": len(kept),
        "n_tested": n_tests, "n_removed_disconnected": n_skipped, "n_batched_passes": n_passes,
        "metric_clean": clean_value, "metric_all_patched": corrupted_value, "metric_final": current,
        "order": "receivers in reverse topological order; senders latest first",
        "positions": None if graph.positions is None else list(graph.positions),
        "seconds": time.perf_counter() - started,
    }
    return Circuit(edges=tuple(kept), scores={e.name: tested_change[e.name] for e in kept if e.name in tested_change},
                   method="acdc", meta=meta)


# ----------------------------------------------------------------------------------------------
# Selection from scores
# ----------------------------------------------------------------------------------------------


def _check_scores(scores: Tensor, graph: EdgeGraph) -> Tensor:
    scores = torch.as_tensor(scores).detach().float().cpu()
    if scores.shape != (len(graph),):
        raise ValueError(f"scores must be one per edge of the graph, Tensor[{len(graph)}], got {tuple(scores.shape)}.")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN.")
    return scores


def top_n(scores: Float[Tensor, "n_edges"], graph: EdgeGraph, n: int, *, absolute: bool = True,
          method: str = "top_n") -> Circuit:
    """The ``n`` edges with the largest ``|score|`` (``score`` when not ``absolute``); ties by edge
    order. ``Circuit.scores`` keeps the signed scores."""
    scores = _check_scores(scores, graph)
    if not isinstance(n, int) or not 1 <= n <= len(graph):
        raise ValueError(f"n must be an int in 1..{len(graph)} (a circuit needs at least one edge), got {n!r}.")
    key = scores.abs() if absolute else scores
    order = torch.sort(key, descending=True, stable=True).indices[:n].sort().values
    edges = tuple(graph.edges[i] for i in order.tolist())
    return Circuit(edges=edges, scores={e.name: float(scores[i]) for e, i in zip(edges, order.tolist())},
                   method=method, meta={"selection": "top_n", "n": n, "absolute": absolute})


def threshold(scores: Float[Tensor, "n_edges"], graph: EdgeGraph, t: float, *, absolute: bool = True,
              allow_empty: bool = False, method: str = "threshold") -> Circuit:
    """Every edge with ``|score| >= t`` (``score >= t`` when not ``absolute``); an empty result is
    an error unless ``allow_empty``."""
    scores = _check_scores(scores, graph)
    t = float(t)
    if absolute and (not math.isfinite(t) or t < 0):
        raise ValueError(f"The threshold on |score| must be a finite number >= 0, got {t!r}.")
    key = scores.abs() if absolute else scores
    idx = (key >= t).nonzero()[:, 0].tolist()
    if not idx and not allow_empty:
        raise ValueError(f"No edge has {'|score|' if absolute else 'score'} >= {t:g} (max {float(key.max()):.3g}): "
                         "lower the threshold, or pass allow_empty=True.")
    edges = tuple(graph.edges[i] for i in idx)
    return Circuit(edges=edges, scores={graph.edges[i].name: float(scores[i]) for i in idx}, method=method,
                   meta={"selection": "threshold", "t": t, "absolute": absolute})


# ----------------------------------------------------------------------------------------------
# Node roll-up
# ----------------------------------------------------------------------------------------------


def rollup_to_heads(circuit: Circuit) -> dict[str, dict]:
    """Per node of a circuit (``"embed"``, ``"a{L}.h{H}"``, ``"m{L}"``, ``"logits"``): how many of
    its edges the circuit keeps and their summed ``|score|``.

    Each value: ``{"in_edges", "out_edges", "in_score", "out_score", "inputs": {"q", "k", "v"}
    (incoming edges per head input), "in_positions" / "out_positions" ({label: count}; "all" for
    edges without a position), "layer", "head" (None for embed / MLPs / logits)}``. Nodes with no
    edge are absent. An empty circuit is an error.
    """
    circuit.require_nonempty("rolling it up to heads")
    nodes: dict[str, dict] = {}

    def node(name: str) -> dict:
        if name not in nodes:
            layer = head = None
            if name.startswith("a"):
                layer, head = (int(x) for x in name[1:].split(".h"))
            elif name.startswith("m"):
                layer = int(name[1:])
            nodes[name] = {"in_edges": 0, "out_edges": 0, "in_score": 0.0, "out_score": 0.0,
                           "inputs": {"q": 0, "k": 0, "v": 0}, "in_positions": {}, "out_positions": {},
                           "layer": layer, "head": head}
        return nodes[name]

    for edge in circuit.edges:
        score = abs(circuit.scores.get(edge.name, 0.0))
        pos = edge.position or "all"
        out = node(edge.sender)
        out["out_edges"] += 1
        out["out_score"] += score
        out["out_positions"][pos] = out["out_positions"].get(pos, 0) + 1
        target = _owner(edge.receiver) or "logits"
        into = node(target)
        into["in_edges"] += 1
        into["in_score"] += score
        into["in_positions"][pos] = into["in_positions"].get(pos, 0) + 1
        if edge.receiver.startswith("a"):
            into["inputs"][edge.receiver[-1]] += 1
    return nodes
