"""Exact edge patching: many edge sets, one batched pass each chunk.

Definition (ACDC's, AutoCircuit's and EAP-IG's ``evaluate_graph``). For an edge set ``E``, run the
clean tokens; every receiver ``r`` (a head's q, k or v input, an MLP's input, the logits' input,
all *before* their LayerNorm) reads

    x_r = resid_r + sum_{(s -> r [@pos]) in E} (a_s^target - a_s)   [only at pos, when given]

where ``resid_r`` is the residual stream at ``r`` in this run, ``a_s`` the sender's output in this
run (which may itself differ from the clean run through earlier patched edges) and ``a_s^target``
the sender's output in the corrupted run (``corrupted_tokens``) or the given mean
(``mean_activations``: mean ablation). Since GPT-2's residual stream is the sum of the sender
outputs (plus biases, which cancel), this replaces exactly the listed senders' contributions to
that receiver's input and nothing else. Consequences (tested): patching every edge into a receiver
equals activation patching of its input; patching every edge out of a head equals patching the
head's output; the empty set is the clean run.

* ``mode="patch"``: the listed edges carry the difference, every other edge stays clean.
* ``mode="keep"`` (circuit evaluation): the listed edges stay clean, every other edge of the graph
  carries the difference (an empty circuit is then the corrupted run; with a position graph, only
  at the graph's position slots: include ``"other"`` in its positions to cover every token).

Position-specific edges (``graph`` built with ``positions``) restrict an edge's difference to that
label's token position of each prompt (``word_idx[label][n]``).

With a :class:`~ioi.metrics.LogitDiff` metric the prompts are grouped by length (sorted by END,
:func:`ioi.plain_forward.length_chunks`) and each prompt chunk runs only up to its own longest END:
causal attention makes the positions after a prompt's END irrelevant to its logit difference, so
this is exact and computes (almost) no padding.

On a CPU with ``T > 1`` torch threads and a :class:`~ioi.metrics.LogitDiff` metric, the chunks of
sets run on ``T`` worker threads with one torch thread each (``PARALLEL_SETS``; the memory budget is
shared by the workers): the engine's many small and memory-bound operations scale far better across
chunks than within one op. Each chunk's arithmetic is single-threaded, so results are bit-identical
between runs at the same ``T`` and equal the serial path to float32 rounding (tests).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ioi._threads import map_on_workers
from ioi.edges._engine import EdgeForward, slot_token_index
from ioi.edges.graph import EdgeGraph
from ioi.metrics import LogitDiff
from ioi.patching._fast_forward import net_weights
from ioi.plain_forward import length_chunks

Mode = Literal["patch", "keep"]
DEFAULT_MEMORY_BUDGET_MB = {"cpu": 1024, "cuda": 8192}
_BYTES = 4
# Chunks of sets on one worker thread per torch thread on a CPU (see the module docstring).
PARALLEL_SETS = True
# Prompt chunks are cut by length (:func:`ioi.plain_forward.length_chunks`, prompts sorted by END):
# a chunk also ends where END changes once it holds this many rows (prompts x positions), so each
# chunk is computed up to its own longest END with little or no padding.
MIN_CHUNK_ROWS = 128
# Where at most RESUME_MAX_BATCH sets fit a pass (a large model: batching sets gains little there),
# the sets run one a pass in trie order, each resumed from the previous one (patch_edges).
RESUME_SETS = True
RESUME_MAX_BATCH = 4

__all__ = ["edge_forward", "mean_sender_outputs", "patch_edges", "sender_outputs", "set_masks"]


def edge_forward(model, graph: EdgeGraph) -> EdgeForward:
    """The receiver-input engine of ``model`` (weights read once and cached per model)."""
    return EdgeForward(net_weights(model), graph)


def set_masks(graph: EdgeGraph, edge_sets, mode: Mode = "patch") -> Tensor:
    """``BoolTensor[n_sets, n_edges]``: which edges carry the difference in each set."""
    if mode not in ("patch", "keep"):
        raise ValueError(f"mode must be 'patch' (listed edges patched) or 'keep' (listed edges kept "
                         f"clean, the rest patched), got {mode!r}.")
    mask = graph.edge_mask(edge_sets)
    return mask if mode == "patch" else ~mask


@torch.no_grad()
def sender_outputs(model, tokens: Int[Tensor, "n pos"], graph: EdgeGraph) -> Float[Tensor, "senders n pos d"]:
    """Every sender's output on ``tokens`` (``graph.senders`` order): the embedding, each head's
    ``z @ W_O[h]`` (no ``b_O``), each MLP's output."""
    engine = edge_forward(model, graph)
    return engine.sender_outputs(torch.as_tensor(tokens).to(engine.device))


def mean_sender_outputs(
    model, tokens: Int[Tensor, "n pos"], graph: EdgeGraph, groups: list[Tensor] | None = None
) -> Float[Tensor, "senders n_or_1 pos d"]:
    """Mean ablation values: each sender's output averaged over prompts (per position), or over
    each group of prompts (e.g. templates, as ``ioi.ablation``: then ``[senders, n, pos, d]`` with
    every prompt given its group's mean)."""
    outs = sender_outputs(model, tokens, graph)
    if groups is None:
        return outs.mean(1, keepdim=True)
    means = torch.empty_like(outs)
    for group in groups:
        means[:, group] = outs[:, group].mean(1, keepdim=True)
    return means


def _distinct_sets(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(distinct rows of mask in order of first appearance, LongTensor[n_sets] row of each set)``."""
    uniq, inverse = torch.unique(mask, dim=0, return_inverse=True)
    if len(uniq) == len(mask):
        return mask, torch.arange(len(mask), device="cpu")
    first = torch.full((len(uniq),), len(mask), dtype=torch.long, device="cpu").scatter_reduce(
        0, inverse, torch.arange(len(mask), device="cpu"), reduce="amin")
    order = torch.argsort(first)  # distinct sets by first appearance
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device="cpu")
    return mask[first[order]], position[inverse]


def _trie_order(mask: Tensor) -> list[int]:
    """The sets (rows of ``mask`` ``[n_sets, n_edges]``, edges in receiver order) sorted
    lexicographically: each set then shares with the one before it the longest prefix of
    receivers that any earlier set shares with it."""
    rows = mask.cpu().numpy().astype("uint8")
    return sorted(range(len(rows)), key=lambda i: rows[i].tobytes())


def _trie_parts(engine: EdgeForward, host_all: Tensor, order: list[int], parts: int) -> list[list[int]]:
    """``order`` (the trie walk) cut into at most ``parts`` consecutive pieces of about equal work:
    a set resumed from its predecessor runs the stages from the first receiver whose mask row
    differs (at most the last layer's attention, where END rows take over); the first set of a
    piece runs every stage. Decided from the host masks alone (the same pieces every run)."""
    n = len(order)
    if parts <= 1 or n < 2 * parts:
        return [order]
    n_stages = engine.n_stages
    last_attention = 2 * (engine.net.n_layers - 1)
    cost = [float(n_stages)]
    for prev, cur in zip(order[:-1], order[1:]):
        changed = (host_all[cur] != host_all[prev]).any(-1).any(0).nonzero()[:, 0]
        g = int(engine.receiver_stage[changed].min()) if len(changed) else n_stages - 1
        cost.append(float(n_stages - min(g, last_attention)))
    total = sum(cost)
    pieces, start, acc = [], 0, 0.0
    for i, c in enumerate(cost):
        acc += c
        if len(pieces) < parts - 1 and acc >= total * (len(pieces) + 1) / parts and i + 1 < n:
            pieces.append(order[start : i + 1])
            start = i + 1
    pieces.append(order[start:])
    return pieces


def _resumed_sets(engine: EdgeForward, mask: Tensor, clean, corrupted, means, metric: LogitDiff, graph: EdgeGraph, word_idx,
                  host_all: Tensor, dense_all: Tensor, chunks: list[Tensor], end_cpu: Tensor, per_prompt: Tensor,
                  workers: int, bar, stats: dict | None) -> None:
    """Every set on every prompt chunk, one set a pass, sets in trie order, each pass resumed
    from the previous one on its chunk (:class:`ioi.edges._engine.Trail`). On ``workers > 1``
    threads the trie walk is also cut into ``workers`` pieces of about equal work
    (:func:`_trie_parts`) and each (chunk, piece) is one job, largest first: the workers then
    finish together (whole chunks alone left one idle for up to a chunk's share; each piece
    computes its chunk's target outputs again, one pass per extra piece). Writes ``per_prompt``."""
    from ioi.edges._engine import Trail

    device = engine.device
    order = _trie_order(mask)
    pieces = _trie_parts(engine, host_all, order, workers)
    counts: list[Trail] = []

    def chunk_job(job: tuple[Tensor, list[int]]) -> None:
        rows, piece = job
        P_chunk = int(end_cpu[rows].max()) + 1
        rows_dev = rows.to(device)
        toks = clean[rows_dev, :P_chunk]
        chunk_idx = None if word_idx is None else {k: torch.as_tensor(v)[rows] for k, v in word_idx.items()}
        slots = slot_token_index(graph, chunk_idx, toks.shape[0], P_chunk, device)
        target = (engine.sender_outputs(corrupted[rows_dev, :P_chunk]) if corrupted is not None
                  else means[:, rows_dev, :P_chunk].contiguous())
        m = metric[rows]
        ends, io_ids, s_ids = m.end_idx.to(device).long(), m.io_ids.to(device), m.s_ids.to(device)
        trail = Trail()
        for s in piece:
            final, _ = engine.run(toks, dense_all[s : s + 1], slots, target=target, end_pos=ends,
                                  host_masks=host_all[s : s + 1], trail=trail)
            io, s_logit = engine.net.answer_logits(final[:, :, 0], io_ids, s_ids)
            per_prompt[s, rows_dev] = (io - s_logit)[0]
            bar.update(1)
        counts.append(trail)

    jobs = [(rows, piece) for rows in chunks for piece in pieces]
    work = [len(rows) * (int(end_cpu[rows].max()) + 1) for rows, _ in jobs]  # the pieces: about equal work
    largest_first = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: -work[i])]
    map_on_workers(chunk_job, largest_first, workers)
    if stats is not None:
        stats.update(runs=sum(t.runs for t in counts), stages_run=sum(t.stages_run for t in counts),
                     stages_skipped=sum(t.stages_skipped for t in counts), n_stages=engine.n_stages,
                     trie_pieces=len(pieces))


def _budget(memory_budget_mb: float | None, device: torch.device) -> float:
    mb = DEFAULT_MEMORY_BUDGET_MB.get(device.type, 1024) if memory_budget_mb is None else memory_budget_mb
    return float(mb) * 2**20


def _bytes_per_prompt_set(engine: EdgeForward, n_pos: int) -> float:
    """Working memory of one (prompt, set) pair: differences, receiver inputs, projections."""
    net = engine.net
    per_token = net.d_model * (engine.n_senders + 2 * 3 * net.n_heads + net.n_heads + 8) + 4 * net.d_mlp
    return _BYTES * n_pos * per_token + _BYTES * net.n_heads * n_pos * n_pos * 2


def _workers(device: torch.device) -> int:
    """Chunks of sets run at once: the torch thread count on a CPU (``PARALLEL_SETS``), else 1."""
    return max(1, torch.get_num_threads()) if PARALLEL_SETS and device.type == "cpu" else 1


@torch.no_grad()
def patch_edges(
    model,
    clean_tokens: Int[Tensor, "n pos"],
    corrupted_tokens: Int[Tensor, "n pos"] | None,
    edge_sets,
    metric: LogitDiff | Callable[[Tensor], Tensor],
    *,
    graph: EdgeGraph,
    word_idx: dict[str, Tensor] | None = None,
    mean_activations: Float[Tensor, "senders n_or_1 pos d"] | None = None,
    mode: Mode = "patch",
    memory_budget_mb: float | None = None,
    max_sets_per_batch: int | None = None,
    progress: bool = False,
    stats: dict | None = None,
) -> Tensor:
    """The metric with each edge set patched (see the module docstring): ``Tensor[n_sets]``
    (``[n_sets, n]`` for a per-prompt metric).

    Args:
        clean_tokens / corrupted_tokens: ``[n, pos]`` (same shape; right padding is fine, the
            metric reads each prompt's END). ``corrupted_tokens=None`` with ``mean_activations``.
        edge_sets: a list of edge sets (each a :class:`~ioi.edges.Circuit`, a list of edges or edge
            names, or a ``BoolTensor[n_edges]``), or a ``BoolTensor[n_sets, n_edges]``.
        metric: an :class:`ioi.metrics.LogitDiff` (fast: only END rows and two logit columns, and
            prompts chunked to the memory budget) or any callable on full logits ``[n, pos, vocab]``
            returning a scalar (all prompts in one chunk).
        graph: the :class:`~ioi.edges.EdgeGraph` the edges belong to.
        word_idx: per-prompt positions (``dataset.word_idx``), needed for a position graph.
        mean_activations: mean-ablation values ``[senders, n or 1, pos, d]``
            (:func:`mean_sender_outputs`) instead of a corrupted run.
        mode: ``"patch"`` or ``"keep"``.
        memory_budget_mb: working memory of one batched pass (default 1 GiB on CPU).
        stats: a dict filled with ``runs`` (engine passes), ``stages_run`` / ``stages_skipped``
            (stages computed / resumed over, summed over passes) and ``n_stages`` (per pass); when
            resumed, also ``trie_pieces`` (the trie walk's pieces, one per worker thread).

    Where at most ``RESUME_MAX_BATCH`` sets fit a pass in the memory budget, or
    ``max_sets_per_batch=1`` (``RESUME_SETS``, a :class:`~ioi.metrics.LogitDiff` metric), the sets
    are evaluated one a pass in lexicographic order of their masks in receiver order (a walk of
    their trie), each resumed from the previous set's pass on the same prompt
    chunk where their masks agree on every receiver before a stage (:class:`ioi.edges._engine.Trail`):
    nested circuits (top-n, faithfulness curves, ACDC-like sweeps) share their early layers.
    Results are returned in the caller's order and equal independent passes up to float32 rounding.
    """
    engine = edge_forward(model, graph)
    device = engine.device
    clean = torch.as_tensor(clean_tokens).long().to(device)
    if clean.ndim != 2:
        raise ValueError(f"clean_tokens must be [n, pos], got shape {tuple(clean.shape)}.")
    n, P = clean.shape
    if (corrupted_tokens is None) == (mean_activations is None):
        raise ValueError("Give exactly one of corrupted_tokens (patching) and mean_activations (mean ablation).")
    corrupted = None
    if corrupted_tokens is not None:
        corrupted = torch.as_tensor(corrupted_tokens).long().to(device)
        if corrupted.shape != clean.shape:
            raise ValueError(f"corrupted_tokens {tuple(corrupted.shape)} must match clean_tokens {tuple(clean.shape)} "
                             "(position-aligned prompts, as p_ABC).")
    means = None
    if mean_activations is not None:
        means = mean_activations.to(device)
        if means.ndim != 4 or means.shape[0] != engine.n_senders or means.shape[1] not in (1, n) or means.shape[2] < P:
            raise ValueError(f"mean_activations must be [{engine.n_senders} senders, {n} or 1, >= {P}, d_model], "
                             f"got {tuple(means.shape)}: use ioi.edges.mean_sender_outputs.")
        means = means[:, :, :P].expand(-1, n, -1, -1)
    mask = set_masks(graph, edge_sets, mode)
    # each distinct set once (in order of first appearance); repeats take its value
    mask, repeat_of = _distinct_sets(mask)
    n_sets = mask.shape[0]
    is_ld = isinstance(metric, LogitDiff)
    if is_ld:
        if len(metric) != n:
            raise ValueError(f"The metric has {len(metric)} prompts, the tokens {n}.")
        end = metric.end_idx.to(device).long()
        P_used = int(end.max()) + 1
    else:
        P_used = P
    clean = clean[:, :P_used]
    corrupted = None if corrupted is None else corrupted[:, :P_used]
    means = None if means is None else means[:, :, :P_used]

    budget = _budget(memory_budget_mb, device)
    workers = _workers(device) if is_ld and not torch.is_grad_enabled() else 1
    budget /= workers
    per = _bytes_per_prompt_set(engine, P_used)
    prompt_chunk = n if not is_ld else max(1, min(n, int(budget // (2 * per))))
    sets_chunk = max(1, int(budget // (per * prompt_chunk)) - 1)
    few_fit = sets_chunk <= RESUME_MAX_BATCH
    if max_sets_per_batch is not None:
        sets_chunk = max(1, min(sets_chunk, max_sets_per_batch))
    resume = is_ld and RESUME_SETS and (few_fit or sets_chunk == 1) and n_sets > 1
    if resume:  # each pass also keeps the residual and the running sum at every stage and each
        # layer's attention output (the trail)
        per += _BYTES * P_used * engine.net.d_model * (2 * engine.n_stages + engine.net.n_layers)
        prompt_chunk = max(1, min(n, int(budget // (2 * per))))

    host_all = graph.dense_masks(mask)  # [n_sets, slots, R, S] on the CPU: the engine reads the structure there
    dense_all = host_all.to(device)
    results: list[Tensor] = []
    per_prompt = torch.empty(n_sets, n, device=device) if is_ld else None
    if is_ld:  # prompts grouped by length, each chunk cut after its own longest END
        end_cpu = metric.end_idx.cpu().long()
        chunks = length_chunks(end_cpu, prompt_chunk, MIN_CHUNK_ROWS)
    else:
        chunks = [torch.arange(n, device="cpu")]  # prompt indices (CPU, as length_chunks gives)
    bar = tqdm(total=n_sets * len(chunks), disable=not progress, desc="edge patching")
    if resume:
        _resumed_sets(engine, mask, clean, corrupted, means, metric, graph, word_idx, host_all, dense_all, chunks,
                      end_cpu, per_prompt, workers, bar, stats)
        bar.close()
        return metric.reduce(per_prompt).cpu()[repeat_of]
    if stats is not None:
        stats.update(runs=0, stages_run=0, stages_skipped=0, n_stages=engine.n_stages)
    for rows in chunks:
        P_chunk = int(end_cpu[rows].max()) + 1 if is_ld else P_used
        rows_dev = rows.to(device)
        toks = clean[rows_dev, :P_chunk]
        n_rows = toks.shape[0]
        chunk_idx = None if word_idx is None else {k: torch.as_tensor(v)[rows] for k, v in word_idx.items()}
        slots = slot_token_index(graph, chunk_idx, n_rows, P_chunk, device)
        target = (engine.sender_outputs(corrupted[rows_dev, :P_chunk]) if corrupted is not None
                  else means[:, rows_dev, :P_chunk].contiguous())
        if is_ld:
            m = metric[rows]
            ends, io_ids, s_ids = m.end_idx.to(device).long(), m.io_ids.to(device), m.s_ids.to(device)

            def ld_of_sets(s0: int) -> None:  # writes its own [sets, prompts] block of per_prompt
                dense, host = dense_all[s0 : s0 + sets_chunk], host_all[s0 : s0 + sets_chunk]
                final, _ = engine.run(toks, dense, slots, target=target, end_pos=ends, host_masks=host)
                io, s = engine.net.answer_logits(final[:, :, 0], io_ids, s_ids)  # final[:, :, 0]: END rows
                per_prompt[s0 : s0 + dense.shape[0], rows_dev] = io - s
                bar.update(dense.shape[0])

            map_on_workers(ld_of_sets, range(0, n_sets, sets_chunk), workers)
            if stats is not None:
                runs = math.ceil(n_sets / sets_chunk)
                stats.update(runs=stats["runs"] + runs, stages_run=stats["stages_run"] + runs * engine.n_stages)
            continue
        for s0 in range(0, n_sets, sets_chunk):  # any metric on full logits: in order, here
            dense, host = dense_all[s0 : s0 + sets_chunk], host_all[s0 : s0 + sets_chunk]
            final, _ = engine.run(toks, dense, slots, target=target, host_masks=host)
            logits = engine.net.logits(final)
            for j in range(final.shape[0]):
                results.append(torch.as_tensor(metric(logits[j])).detach().float())
            bar.update(dense.shape[0])
    bar.close()
    if is_ld:
        return metric.reduce(per_prompt).cpu()[repeat_of]
    return torch.stack(results).cpu()[repeat_of]
