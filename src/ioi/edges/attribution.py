"""Edge attribution: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024) on the edge graph.

Both score an edge ``s -> r [@pos]`` by a first-order estimate of what patching it does to the
metric:

    score(s -> r) = sum_{prompts, positions} (a_s^target - a_s^clean) . g_r

with ``a_s`` sender outputs of the clean and the corrupted run (or the mean-ablation values),
``g_r`` a gradient of the metric with respect to the receiver's input ``x_r`` (before its
LayerNorm), summed over every token position (or, for a position edge, over that label's
position of each prompt). The metric is the mean over prompts, as in ``ioi.metrics``: the score
estimates ``metric(edge patched) - metric(clean)`` (:func:`ioi.edges.patch_edges` gives the exact
value).

* **EAP**: ``g_r = d metric / d x_r`` in the clean run. One clean forward (with the sender
  outputs), one corrupted forward and one backward give every edge's score.
* **EAP-IG** (Hanna et al.'s "EAP-IG-inputs", the method of their paper and default of their
  code): the only input interpolated is the embedding sender's output (token + position
  embedding, every position): ``e(alpha) = e_corrupted + alpha * (e_clean - e_corrupted)``; the
  rest of the network runs normally on it, and ``g_r`` is the mean over the ``steps`` values of
  alpha of ``d metric / d x_r`` at ``e(alpha)``. The activation differences ``a^target - a^clean``
  stay those of the clean and corrupted runs. ``rule="left"`` uses ``alpha = k / steps`` for
  ``k = 0 .. steps - 1`` (their code); ``"right"`` uses ``k = 1 .. steps`` (``steps=1`` is then
  EAP); ``"midpoint"`` uses ``(k + 1/2) / steps``.

The receiver inputs are the engine's (:mod:`ioi.edges._engine`): each receiver reads
``resid + M . delta`` with a zero mask ``M``, whose gradient is exactly the score table
(AutoCircuit's mask-gradient formulation). The forward is the plain one (M = 0); the backward
takes each receiver's input gradient through its own LayerNorm by hand
(:func:`ioi.edges._engine.probed_forward`) and contracts it with the differences.

:func:`eap_and_eap_ig_scores` gives both tables from one pass over the prompt chunks (one
corrupted run per chunk; EAP-IG's differences are those the EAP pass fills in): what
``edge_circuits`` calls.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ioi.edges._engine import EdgeForward, probed_forward, slot_token_index
from ioi.edges.graph import EdgeGraph
from ioi.edges import patching as _patching
from ioi.edges.patching import _BYTES, _budget
from ioi.patching._fast_forward import NetWeights, net_weights
from ioi.metrics import LogitDiff
from ioi.plain_forward import length_chunks

__all__ = ["eap_and_eap_ig_scores", "eap_ig_scores", "eap_scores"]

Rule = Literal["left", "right", "midpoint"]


def _alphas(steps: int, rule: Rule) -> list[float]:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    if rule == "left":
        return [k / steps for k in range(steps)]
    if rule == "right":
        return [(k + 1) / steps for k in range(steps)]
    if rule == "midpoint":
        return [(k + 0.5) / steps for k in range(steps)]
    raise ValueError(f"rule must be 'left' (Hanna et al.'s code), 'right' or 'midpoint', got {rule!r}.")


def _affine_slope(metric: LogitDiff) -> float:
    """``metric = slope * mean(LD) + offset``: the slope of its normalisation."""
    if metric.per_prompt:
        raise ValueError("Attribution needs a scalar metric: use a LogitDiff with per_prompt=False.")
    one = metric.reduce(torch.ones(1, dtype=torch.float64, device="cpu"))
    zero = metric.reduce(torch.zeros(1, dtype=torch.float64, device="cpu"))
    return float(one - zero)


def _grad_bytes_per_prompt(engine: EdgeForward, n_pos: int) -> float:
    net = engine.net
    saved = net.n_layers * (3 * net.n_heads * 4 + 8) * net.d_model + net.n_layers * 4 * net.d_mlp
    return _BYTES * n_pos * (saved + 2 * engine.n_senders * net.d_model)


def _grad_engine(model, graph: EdgeGraph) -> EdgeForward:
    """The engine with weights autograd can save (not inference tensors: the cached weights may
    have been read under ``torch.inference_mode``)."""
    net = net_weights(model)
    tensors = [v for v in vars(net).values() if isinstance(v, Tensor)]
    tensors += [t for pair in (*net.ln1, *net.ln2, net.ln_final) for t in pair if t is not None]
    if any(t.is_inference() for t in tensors):
        net = NetWeights.from_bridge(model)
    return EdgeForward(net, graph)


def _scores(*args, **kwargs) -> dict[str, Tensor]:
    with torch.inference_mode(False), torch.enable_grad():
        return _scores_impl(*args, **kwargs)


def _scores_impl(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor | None,
    metric,
    graph: EdgeGraph,
    *,
    eap: bool,
    alphas: list[float] | None,
    word_idx: dict | None,
    mean_activations: Tensor | None,
    memory_budget_mb: float | None,
    progress: bool,
) -> dict[str, Tensor]:
    """The EAP table (``eap``) and/or the EAP-IG table (``alphas``), chunk by chunk.

    Both at once share each chunk's corrupted sender outputs, and EAP-IG takes its differences
    ``target - clean`` from the EAP pass (which fills them in during its clean forward) instead
    of a separate clean forward."""
    engine = _grad_engine(model, graph)
    device = engine.device
    clean = torch.as_tensor(clean_tokens).long().to(device).clone()
    n, P = clean.shape
    if (corrupted_tokens is None) == (mean_activations is None):
        raise ValueError("Give exactly one of corrupted_tokens (patching) and mean_activations (mean ablation).")
    corrupted = None if corrupted_tokens is None else torch.as_tensor(corrupted_tokens).long().to(device).clone()
    if corrupted is not None and corrupted.shape != clean.shape:
        raise ValueError(f"corrupted_tokens {tuple(corrupted.shape)} must match clean_tokens {tuple(clean.shape)}.")
    if alphas is not None and corrupted is None:
        raise ValueError("EAP-IG interpolates between the clean and corrupted inputs: pass corrupted_tokens.")
    is_ld = isinstance(metric, LogitDiff)
    if is_ld:
        if len(metric) != n:
            raise ValueError(f"The metric has {len(metric)} prompts, the tokens {n}.")
        slope = _affine_slope(metric)
        P = int(metric.end_idx.max()) + 1
        clean = clean[:, :P]
        corrupted = None if corrupted is None else corrupted[:, :P]
    means = None
    if mean_activations is not None:
        means = mean_activations.to(device)[:, :, :P].expand(-1, n, -1, -1).clone()
    chunks = [torch.arange(n, device="cpu")]  # prompt indices (CPU, as length_chunks gives)
    if is_ld:  # prompts grouped by length, each chunk cut after its own longest END
        per_chunk = max(1, min(n, int(_budget(memory_budget_mb, device) // _grad_bytes_per_prompt(engine, P))))
        end_cpu = metric.end_idx.cpu().long()
        chunks = length_chunks(end_cpu, per_chunk, _patching.MIN_CHUNK_ROWS)
    table_shape = (graph.n_slots, engine.n_receivers, engine.n_senders)
    eap_total = torch.zeros(table_shape, device=device) if eap else None
    ig_total = None if alphas is None else torch.zeros(table_shape, device=device)
    bar = tqdm(total=(int(eap) + len(alphas or ())) * len(chunks), disable=not progress, desc="attribution")
    for rows in chunks:
        P_chunk = int(end_cpu[rows].max()) + 1 if is_ld else P
        rows = rows.to(device)
        toks = clean[rows, :P_chunk]
        n_rows = toks.shape[0]
        chunk_idx = None if word_idx is None else {k: torch.as_tensor(v)[rows.cpu()] for k, v in word_idx.items()}
        slots = slot_token_index(graph, chunk_idx, n_rows, P_chunk, device)
        m = metric[rows.cpu()] if is_ld else None

        def mask_grad(final: Tensor, mask: Tensor) -> Tensor:
            final = final[None]
            if is_ld:
                ends = m.end_idx.to(device).long()
                at_end = final[:, torch.arange(n_rows, device=device), ends]
                io, s = engine.net.answer_logits(at_end, m.io_ids.to(device), m.s_ids.to(device))
                value = slope * (io - s).sum() / n
            else:
                value = metric(engine.net.logits(final)[0])
            (grad,) = torch.autograd.grad(value, mask)
            return grad

        with torch.no_grad():
            target = (engine.sender_outputs(corrupted[rows, :P_chunk]) if corrupted is not None
                      else means[:, rows, :P_chunk])
        delta = None
        if eap:  # the probed clean forward fills in target - clean outputs
            mask = torch.zeros(table_shape, device=device, requires_grad=True)
            with torch.enable_grad():
                final, delta = probed_forward(engine, toks, mask, slots, None, target=target, return_delta=True)
                eap_total += mask_grad(final, mask)
            del final, mask
            bar.update(1)
        if alphas is None:
            continue
        with torch.no_grad():
            if delta is None:
                clean_out = engine.sender_outputs(toks)
                delta = (target - clean_out).contiguous()
                e_clean = clean_out[0]
                del clean_out
            else:  # the EAP pass's differences; its clean embedding is the plain one
                e_clean = engine.embed(toks)
            e_corr = target[0]
        for alpha in alphas:
            embed = e_corr + alpha * (e_clean - e_corr)
            mask = torch.zeros(table_shape, device=device, requires_grad=True)
            with torch.enable_grad():
                final = probed_forward(engine, toks, mask, slots, delta, embed=embed)
                ig_total += mask_grad(final, mask)
            del final, mask
            bar.update(1)
    bar.close()
    out = {}
    if eap:
        out["eap"] = graph.dense_to_scores(eap_total.cpu())
    if alphas is not None:
        ig_total /= len(alphas)
        out["eap_ig"] = graph.dense_to_scores(ig_total.cpu())
    return out


def eap_scores(
    model,
    clean_tokens: Int[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"] | None,
    metric: LogitDiff | Callable[[Tensor], Tensor],
    graph: EdgeGraph,
    *,
    word_idx: dict | None = None,
    mean_activations: Float[Tensor, "senders n_or_1 pos d"] | None = None,
    memory_budget_mb: float | None = None,
    progress: bool = False,
) -> Float[Tensor, "n_edges"]:
    """EAP score of every edge of ``graph`` (``graph.edges`` order); see the module docstring.

    ``metric``: a scalar :class:`ioi.metrics.LogitDiff` (prompts chunked to ``memory_budget_mb``)
    or a callable on full logits ``[n, pos, vocab]`` returning a differentiable scalar (one chunk).
    """
    return _scores(model, clean_tokens, corrupted_tokens, metric, graph, eap=True, alphas=None,
                   word_idx=word_idx, mean_activations=mean_activations, memory_budget_mb=memory_budget_mb,
                   progress=progress)["eap"]


def eap_ig_scores(
    model,
    clean_tokens: Int[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"],
    metric: LogitDiff | Callable[[Tensor], Tensor],
    graph: EdgeGraph,
    *,
    steps: int = 5,
    rule: Rule = "left",
    word_idx: dict | None = None,
    memory_budget_mb: float | None = None,
    progress: bool = False,
) -> Float[Tensor, "n_edges"]:
    """EAP-IG score of every edge (embedding interpolated in ``steps`` steps; module docstring).

    ``steps=5`` as in Hanna et al.'s README (their function's default is 30)."""
    return _scores(model, clean_tokens, corrupted_tokens, metric, graph, eap=False,
                   alphas=_alphas(steps, rule), word_idx=word_idx, mean_activations=None,
                   memory_budget_mb=memory_budget_mb, progress=progress)["eap_ig"]


def eap_and_eap_ig_scores(
    model,
    clean_tokens: Int[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"],
    metric: LogitDiff | Callable[[Tensor], Tensor],
    graph: EdgeGraph,
    *,
    steps: int = 5,
    rule: Rule = "left",
    word_idx: dict | None = None,
    memory_budget_mb: float | None = None,
    progress: bool = False,
) -> dict[str, Float[Tensor, "n_edges"]]:
    """``{"eap": eap_scores(...), "eap_ig": eap_ig_scores(...)}`` in one pass over the chunks.

    The two share each chunk's corrupted run, and EAP-IG's differences (corrupted - clean sender
    outputs) are those the EAP pass fills in, so the clean run is not repeated: one corrupted
    forward, one EAP forward + backward and ``steps`` EAP-IG forwards + backwards per chunk
    (separately: two corrupted forwards and one more clean forward). Equal to the two functions up
    to fp32 rounding (EAP-IG's differences come from the probed instead of the plain forward)."""
    return _scores(model, clean_tokens, corrupted_tokens, metric, graph, eap=True,
                   alphas=_alphas(steps, rule), word_idx=word_idx, mean_activations=None,
                   memory_budget_mb=memory_budget_mb, progress=progress)
