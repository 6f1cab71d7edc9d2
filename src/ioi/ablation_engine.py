"""Batched knockouts (mean ablations) on the plain-tensor forward that path patching uses.

What is computed
----------------
A *knockout spec* says, for every prompt ``n``, position ``p``, layer ``l`` and head ``h``, whether
the head's output ``z[n, p, l, h]`` is kept (``head_keep = True``) or replaced by the given mean
``head_means[n, p, l, h]`` (the template-wise p_ABC mean of :func:`ioi.ablation.compute_template_means`),
and optionally the same for every MLP output (``mlp_keep`` / ``mlp_means``). Its value is the
model's output with those replacements: the per-prompt logit difference at END (or the full logits),
exactly as the hooks of :class:`ioi.ablation.Ablation` give on the bridge
(:mod:`ioi.ablation_reference`, the slow twin; tests: equal to 1e-4).

How (every shortcut exact)
--------------------------
Many specs run in one batched pass (``k`` specs x the rows that change), chunked to a memory
budget. Two *source streams* are computed once and shared:

* the clean run (nothing ablated) -- the source of F(M\\K)-like specs, which ablate a few heads at a
  few positions. Causal attention: a prompt's rows before its first ablated position are clean, so
  only rows from there to END are recomputed (a window), from the first layer where anything is
  ablated;
* the all-ablated run (every head mean-ablated everywhere, MLPs intact) -- the source of
  F(C)/F(C\\K)-like specs. A row where no head is kept at any layer reads nothing from other rows
  (its attention output is the means), so it equals the all-ablated run; only the rows where some
  head is kept (for the paper's circuit: S1+1, S2 and END) are recomputed, and only the kept heads
  need ``q``/``k``/``v`` (an ablated head needs none).

A spec may also *resume* from a stored run whose masks agree with it below some layer (e.g.
F(C\\(K∪{v})) from F(C\\K) at v's layer): below that layer the two runs are equal at every row,
so the pass starts there from the stored run's residual stream. Rows that are not recomputed use
the source stream's keys and values. In the last layer only END rows are computed (LD mode).

Attention at the recomputed rows, two layouts (same maths): for clean-source chunks (long windows
from the first ablated position to END) each spec's keys/values are laid out in full ``[k, N *
seq]`` buffers (the source's at the other rows, reused by every layer of the chunk) and only the
query rows that are needed (the window's rows; END rows only in the last layer in LD mode) attend to
them, in a padded per-prompt query window with an explicit causal bias (``WINDOW_QUERIES``; off:
every row of every prompt through the fused causal kernel, the old layout, kept as the twin the
tests compare with); for all-ablated-source chunks (a few rows per prompt, few heads) the
recomputed rows sit in a padded per-prompt window and attend to the source keys shared by the
chunk's specs, without copying them per spec.

Rows are packed (prompt-major lists of (prompt, position)); everything after a prompt's END is
skipped in LD mode.

Parallel prompt parts on a CPU (default)
----------------------------------------
Prompts never read each other (attention is within a prompt), so a pass splits exactly along
prompts. With ``parallel_prompts=True`` (class default :attr:`KnockoutEngine.PARALLEL_PROMPTS`, on)
and ``T > 1`` torch threads on a CPU, :meth:`KnockoutEngine.evaluate` cuts the prompts into ``T``
contiguous parts with about equal rows up to END (:func:`balanced_cuts`: each cut at the prefix
closest to its share; at the paper's N = 100, 50 | 50 prompts, 830 | 837 rows) and runs each part's
whole pass (its groups and chunks in turn, ``budget / T`` of memory) on its own worker thread with
one torch thread, on views of the shared streams; the results are joined along prompts. Captured
runs keep their rows per part, so a later pass in the same parts resumes from them part by part (a
run made on all prompts at once is a base for the parts too, through a view; a run made in parts is
not a base for a serial pass, which then starts from its source: exact either way). Every part does
the same work on half the rows, so the workers finish together (measured with
``benchmarks/knockouts.py --profile-workers``, which times every worker of every pass: on a shared
2-core machine the slower part's CPU time is 1-3% above the mean, as noisy as that machine; the
earlier cut, at the first prefix past the share, gave 51 | 49 prompts at N = 100. The GIL costs
little: every torch op used releases it, and a worker dispatches about a thousand ops per CPU
second), where one chunk at a time on ``T`` OpenMP threads loses CPU time to thread synchronisation
and the serial parts of small ops. Each part's arithmetic is single-threaded: results are
bit-identical between runs at the same ``T`` and equal the serial path to float32 rounding (tests).

Parallel chunks on a CPU (opt-in)
---------------------------------
With ``parallel_chunks=True`` (class default :attr:`KnockoutEngine.PARALLEL_CHUNKS`, off),
``parallel_prompts=False`` and ``T > 1`` torch threads on a CPU, a pass's chunks run on ``T``
worker threads with one torch thread each (largest first; a lone chunk of several specs is split
so every worker has one), sharing the memory budget (``budget / T`` per chunk), instead of one
chunk at a time on ``T`` threads. Same guarantees as above. Measured at the paper's completeness
settings on a quiet 2-core machine (``benchmarks/knockouts.py``,
``benchmarks/measured/knockouts_cpu_2threads*.txt``): it needs 10% less CPU time than serial
chunks (1.48x the FLOP floor per CPU second instead of 1.72x) but takes 16% longer by the clock
(347 s against 298 s), because the workers idle while one finishes the largest chunk (a pass has
few chunks of very different cost).
"""

from __future__ import annotations

import bisect
import collections
import copy
import dataclasses
import threading
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ioi._threads import map_on_workers, one_torch_thread
from ioi.patching._fast_forward import NetWeights, net_weights, row_tiles

Source = Literal["clean", "ablated"]

__all__ = ["KnockoutEngine", "KnockoutRun", "KnockoutSpec", "FlopCounter", "balanced_cuts"]


@dataclasses.dataclass
class KnockoutSpec:
    """One knockout: which head outputs (and MLP outputs) are kept; the rest take the means.

    ``source``: which shared stream the rows that are not recomputed come from (see the module
    doc): ``"ablated"`` for specs that keep few heads (F(C), F(C\\K)), ``"clean"`` for specs that
    ablate few (F(M\\K), head and MLP knockouts). Either is exact; it only decides the cost.
    ``capture``: keep the residual stream at the recomputed rows, so later specs can resume from
    this run.
    """

    head_keep: Bool[Tensor, "batch seq layer head"]
    source: Source
    mlp_keep: Bool[Tensor, "batch seq layer"] | None = None
    capture: bool = False
    tag: object = None


@dataclasses.dataclass
class KnockoutRun:
    """The result of one spec: ``ld [N]`` (float64; LD mode) or ``logits`` (full mode), and -- when
    captured -- the residual stream entering layers ``start .. n_layers - 1`` at ``rows``."""

    spec: KnockoutSpec
    start: int
    base: "KnockoutRun | None"
    ld: Tensor | None = None
    logits: Tensor | None = None
    rows: Tensor | None = None  # flat row indices (n * seq + p) of the captured residuals
    row_index: Tensor | None = None  # [N * seq] -> index in ``rows`` or -1
    resid: list[Tensor] | None = None  # resid[l - start]: [n_rows, d_model]
    # parallel prompt parts: {(first prompt, end prompt): the run on those prompts}
    parts: "dict[tuple[int, int], KnockoutRun] | None" = None

    @property
    def source(self) -> Source:
        return self.spec.source

    def nbytes(self) -> int:
        if self.parts is not None:
            return sum(part.nbytes() for part in self.parts.values())
        return 0 if self.resid is None else sum(t.numel() * t.element_size() for t in self.resid)


@dataclasses.dataclass
class FlopCounter:
    """Multiply-add FLOPs (2 per multiply-add) of the matmuls a pass ran, by kind."""

    mlp: float = 0.0
    qkv: float = 0.0
    attn_out: float = 0.0
    attention: float = 0.0
    unembed: float = 0.0
    streams: float = 0.0  # the shared clean / all-ablated runs
    evaluated: int = 0
    passes: int = 0

    @property
    def total(self) -> float:
        return self.mlp + self.qkv + self.attn_out + self.attention + self.unembed + self.streams


class _Stream:
    """A full forward (clean, or every head mean-ablated) kept per layer: ``resid[l]`` (entering
    layer ``l``; ``resid[n_layers]`` final) as ``[N * seq, d_model]`` and, on demand, the fused
    ``q|k|v`` projections per layer."""

    def __init__(self, net: NetWeights, resid: list[Tensor], qkv: list[Tensor | None], ld: Tensor | None,
                 logits: Tensor | None, flops: "FlopCounter"):
        self.net = net
        self.flops = flops
        self.resid = resid
        self._qkv = qkv
        self.ld = ld
        self.logits = logits
        self.kv_cache: dict[tuple, Tensor] = {}  # (layer, heads) -> keys and values of those heads
        self._lock = threading.Lock()  # parallel chunks project a layer's q|k|v once
        self._parts: dict[tuple[int, int], "_StreamPart"] = {}

    def qkv(self, layer: int) -> Tensor:
        if self._qkv[layer] is None:
            with self._lock:
                if self._qkv[layer] is None:
                    net = self.net
                    self.flops.streams += 6.0 * self.resid[layer].shape[0] * net.d_model * net.hd
                    self._qkv[layer] = net.linear(net.ln(self.resid[layer], net.ln1[layer]), net.W_qkv[layer],
                                                  net.b_qkv[layer])
        return self._qkv[layer]

    def part(self, first: int, end: int, seq: int) -> "_StreamPart":
        """The stream on prompts ``first .. end - 1`` (views; kept for later passes)."""
        key = (first, end)
        if key not in self._parts:
            self._parts[key] = _StreamPart(self, first, end, seq)
        return self._parts[key]


class _StreamPart(_Stream):
    """A :class:`_Stream` on a contiguous range of prompts (for parallel prompt parts): views of the
    whole stream's rows; a layer's ``q|k|v`` not projected on the whole stream is projected here on
    these rows only (so the parts project theirs at once, each on its own worker)."""

    def __init__(self, whole: _Stream, first: int, end: int, seq: int):
        rows = slice(first * seq, end * seq)
        super().__init__(whole.net, [r[rows] for r in whole.resid], [None] * len(whole._qkv),
                         None if whole.ld is None else whole.ld[first:end],
                         None if whole.logits is None else whole.logits[first:end], whole.flops)
        self.whole, self.rows = whole, rows

    def qkv(self, layer: int) -> Tensor:
        if self._qkv[layer] is None:
            whole = self.whole._qkv[layer]
            if whole is not None:
                self._qkv[layer] = whole[self.rows]
            else:
                net = self.net
                self._qkv[layer] = net.linear(net.ln(self.resid[layer], net.ln1[layer]), net.W_qkv[layer],
                                              net.b_qkv[layer])
                with self.whole._lock:  # one counter for every part
                    self.flops.streams += 6.0 * self.resid[layer].shape[0] * net.d_model * net.hd
        return self._qkv[layer]


def balanced_cuts(costs: Sequence[float], parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges ``[(first, end), ...]`` of ``len(costs)`` items, ``parts`` of them (each
    non-empty), whose cost sums are about equal: the ``w``-th cut is the prefix whose sum lies
    closest to ``w / parts`` of the total (for two parts: the cut with the smallest larger part).
    Deterministic (a function of the costs only), so runs at the same settings cut alike."""
    n = len(costs)
    parts = max(1, min(parts, n))
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + float(cost))
    cuts = [0]
    for w in range(1, parts):
        target = prefix[-1] * w / parts
        above = bisect.bisect_left(prefix, target)  # first prefix >= target
        best = min((c for c in (above - 1, above) if 0 <= c <= n), key=lambda c: (abs(prefix[c] - target), c))
        cuts.append(min(max(best, cuts[-1] + 1), n - (parts - w)))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))


class KnockoutEngine:
    """Knockouts on one batch of prompts (see the module doc).

    ``parallel_prompts`` (default :attr:`PARALLEL_PROMPTS`, on): on a CPU with ``T > 1`` torch
    threads, cut the prompts into ``T`` parts, each part's pass on its own worker thread (see
    "Parallel prompt parts on a CPU"). ``parallel_chunks`` (default :attr:`PARALLEL_CHUNKS`, off;
    used only with ``parallel_prompts`` off): run a pass's chunks on one worker thread per torch
    thread (see "Parallel chunks on a CPU (opt-in)"). Both off: one chunk at a time on ``T`` threads.

    ``toks [N, seq]``; ``end [N]``, ``io_ids``/``s_ids [N]`` for the LD at END (``end=None``: full
    logits at every position instead). ``head_means [N, seq', L, H, d_head]`` with ``seq' >= seq``
    (per-prompt means, e.g. template-wise p_ABC means); ``mlp_means [N, seq', L, d_model]`` when
    MLP knockouts are asked for. ``memory_budget_mb`` bounds a pass's working set (chunks of specs).
    """

    PARALLEL_CHUNKS = False  # see the module doc: less CPU time, more wall time on a quiet CPU
    PARALLEL_PROMPTS = True  # see the module doc: "Parallel prompt parts on a CPU"
    # clean-source chunks: attend only the query rows asked for (a padded window per prompt, an
    # explicit causal bias) instead of every row of every prompt (the fused causal kernel)
    WINDOW_QUERIES = True

    def __init__(
        self,
        model_or_net,
        toks: Int[Tensor, "batch seq"],
        *,
        end: Int[Tensor, "batch"] | None = None,
        io_ids: Int[Tensor, "batch"] | None = None,
        s_ids: Int[Tensor, "batch"] | None = None,
        head_means: Float[Tensor, "batch seq layer head d_head"] | None = None,
        mlp_means: Float[Tensor, "batch seq layer d_model"] | None = None,
        memory_budget_mb: int = 1024,
        parallel_chunks: bool | None = None,
        parallel_prompts: bool | None = None,
    ):
        net = model_or_net if isinstance(model_or_net, NetWeights) else net_weights(model_or_net)
        self.net = net
        device = net.device
        toks = torch.as_tensor(toks).to(device)
        N = toks.shape[0]
        self.ld_mode = end is not None
        if self.ld_mode:
            if io_ids is None or s_ids is None:
                raise ValueError("The LD at END needs io_ids and s_ids as well as end.")
            self.end = torch.as_tensor(end).to(device).long()
            if self.end.shape != (N,):
                raise ValueError(f"end must give one position per prompt ({N}); got {tuple(self.end.shape)}.")
            if int(self.end.min()) < 0 or int(self.end.max()) >= toks.shape[1]:
                raise ValueError(f"END positions must lie in [0, {toks.shape[1]}).")
            self.io = torch.as_tensor(io_ids).to(device).long()
            self.s = torch.as_tensor(s_ids).to(device).long()
            self.seq = int(self.end.max()) + 1  # nothing after the last END is read
            self.last = self.end
        else:
            self.seq = toks.shape[1]
            self.last = torch.full((N,), self.seq - 1, dtype=torch.long, device=device)
        if self.seq > net.W_pos.shape[0]:
            raise ValueError(f"{self.seq} positions exceed the model's context of {net.W_pos.shape[0]}.")
        self.toks = toks[:, : self.seq]
        self.n = N
        self.head_means = None if head_means is None else self._check_means(head_means, "head", 5)
        self.mlp_means = None if mlp_means is None else self._check_means(mlp_means, "MLP", 4)
        self.memory_budget_mb = int(memory_budget_mb)
        self.parallel_chunks = self.PARALLEL_CHUNKS if parallel_chunks is None else bool(parallel_chunks)
        self.parallel_prompts = self.PARALLEL_PROMPTS if parallel_prompts is None else bool(parallel_prompts)
        positions = torch.arange(self.seq, device=device)
        self.valid = positions[None, :] <= self.last[:, None]  # [N, seq] rows that can matter
        self.flops = FlopCounter()
        # source -> holder {"stream": _Stream}; the clean holder is shared with with_means() copies
        self._streams: dict[str, dict] = {"clean": {}, "ablated": {}}
        self._mean_out_holder: dict = {}  # "out": the means' attention outputs per layer
        # (head_means, mlp_means, all-ablated holder, mean-out holder) of every with_means() copy
        self._ablated_holders: list[tuple] = []
        self._weight_cache: dict[tuple, tuple[Tensor, ...]] = {}

    def with_means(self, head_means: Tensor | None = None, mlp_means: Tensor | None = None) -> "KnockoutEngine":
        """The same prompts with other means: the clean stream is shared, the all-ablated one is not."""
        other = object.__new__(KnockoutEngine)
        other.__dict__.update(self.__dict__)
        other.head_means = None if head_means is None else self._check_means(head_means, "head", 5)
        other.mlp_means = None if mlp_means is None else self._check_means(mlp_means, "MLP", 4)
        # the clean holder is shared; the all-ablated one by every copy given the same means tensors
        shared = self._ablated_holders
        for means_in, mlp_in, holder, mean_out in shared:
            if means_in is head_means and mlp_in is mlp_means:
                break
        else:
            holder, mean_out = {}, {}
            shared.append((head_means, mlp_means, holder, mean_out))
        other._streams = {"clean": self._streams["clean"], "ablated": holder}
        other._mean_out_holder = mean_out
        other.flops = self.flops  # one counter for everything run on these prompts
        return other

    # -- inputs -------------------------------------------------------------------------------

    def _check_means(self, means: Tensor, what: str, ndim: int) -> Tensor:
        net = self.net
        means = torch.as_tensor(means)
        expected = (self.n, None, net.n_layers) + ((net.n_heads, net.d_head) if ndim == 5 else (net.d_model,))
        if means.ndim != ndim or means.shape[0] != self.n or means.shape[1] < self.seq or any(
            e is not None and s != e for s, e in zip(means.shape, expected)
        ):
            raise ValueError(
                f"{what} means have shape {tuple(means.shape)}; expected per-prompt means "
                f"[{self.n}, >= {self.seq}, {', '.join(str(e) for e in expected[2:])}] (compute_template_means("
                "..., per_prompt=True) over a position-aligned reference batch)."
            )
        return means[:, : self.seq].to(device=net.device, dtype=net.W_E.dtype).contiguous()

    def check_spec(self, spec: KnockoutSpec) -> None:
        net = self.net
        shape = (self.n, self.seq, net.n_layers, net.n_heads)
        if tuple(spec.head_keep.shape) != shape:
            raise ValueError(f"head_keep has shape {tuple(spec.head_keep.shape)}; expected {shape}.")
        if spec.source not in ("clean", "ablated"):
            raise ValueError(f"source must be 'clean' or 'ablated'; got {spec.source!r}.")
        # (the means are checked first: the masks are read only when a mean is missing)
        if self.head_means is None and not bool(spec.head_keep.all()):
            raise ValueError("This spec ablates heads: give the engine head_means.")
        if spec.mlp_keep is not None:
            if tuple(spec.mlp_keep.shape) != shape[:3]:
                raise ValueError(f"mlp_keep has shape {tuple(spec.mlp_keep.shape)}; expected {shape[:3]}.")
            if (self.mlp_means is None or net.attn_only) and not bool(spec.mlp_keep.all()):
                if self.mlp_means is None:
                    raise ValueError("This spec ablates MLPs: give the engine mlp_means.")
                if net.attn_only:
                    raise ValueError("An attention-only model has no MLPs to ablate.")

    # -- the shared streams -------------------------------------------------------------------

    def mean_out(self, layer: int) -> Tensor:
        """``[N * seq, d_model]``: the attention output when every head takes its mean."""
        holder = self._mean_out_holder
        if "out" not in holder:
            net = self.net
            if self.head_means is None:
                raise ValueError("The all-ablated stream needs head_means.")
            flat = self.head_means.reshape(self.n * self.seq, net.n_layers, net.hd)
            holder["out"] = [torch.addmm(net.b_O[l], flat[:, l], net.W_O_flat[l]) for l in range(net.n_layers)]
        return holder["out"][layer]

    def stream(self, source: Source) -> _Stream:
        holder = self._streams.setdefault(source, {})
        if "stream" not in holder:
            holder["stream"] = self._build_stream(source)
        return holder["stream"]

    def _build_stream(self, source: Source) -> _Stream:
        net = self.net
        n_pos = self.seq
        resid = (net.W_E[self.toks] + net.W_pos[:n_pos]).reshape(self.n * n_pos, net.d_model)
        resids, qkvs = [], []
        for layer in range(net.n_layers):
            resids.append(resid)
            if source == "clean":
                qkv = net.linear(net.ln(resid, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])
                qkvs.append(qkv)
                z, _ = net.attention(layer, *net.split_qkv(qkv.view(self.n, n_pos, 3 * net.hd)))
                resid = net.add_attn_out_(layer, resid.clone(), z.reshape(self.n * n_pos, net.hd))
            else:
                qkvs.append(None)  # projected on demand (only kept heads read it)
                resid = resid + self.mean_out(layer)
            resid = net.add_mlp_(layer, resid)
        resids.append(resid)
        rows = self.n * n_pos
        per_layer = 4.0 * rows * net.d_model * net.d_mlp + 2.0 * rows * net.hd * net.d_model
        self.flops.streams += net.n_layers * (per_layer + (6.0 * rows * net.d_model * net.hd if source == "clean" else 0))
        ld = logits = None
        final = resid.view(self.n, n_pos, net.d_model)
        if self.ld_mode:
            io, s = net.answer_logits(final[torch.arange(self.n, device=final.device), self.end], self.io, self.s)
            ld = (io - s).double()
        else:
            logits = net.logits(final)
        return _Stream(net, resids, qkvs, ld, logits, self.flops)

    # -- rows and start layers ----------------------------------------------------------------

    def changed_rows(self, spec: KnockoutSpec) -> Bool[Tensor, "batch seq"]:
        """Rows whose value can differ from the spec's source stream (restricted to rows <= last)."""
        if spec.source == "ablated":
            rows = spec.head_keep.any(3).any(2)
            if spec.mlp_keep is not None:
                rows = rows | (~spec.mlp_keep).any(2)
            return rows & self.valid
        touched = (~spec.head_keep).any(3).any(2)
        if spec.mlp_keep is not None:
            touched = touched | (~spec.mlp_keep).any(2)
        touched = touched & self.valid
        return (touched.long().cummax(1).values > 0) & self.valid  # from the first changed position on

    def _layer_diff(self, spec: KnockoutSpec, base: KnockoutRun | None) -> Bool[Tensor, "layer"]:
        """Layers where the spec's masks differ from its base's (the source stream's when None)."""
        valid = self.valid[:, :, None]
        if base is None:
            heads = spec.head_keep if spec.source == "ablated" else ~spec.head_keep
            diff = (heads.any(3) & valid).any(1).any(0)
            if spec.mlp_keep is not None:
                diff = diff | ((~spec.mlp_keep) & valid).any(1).any(0)
            return diff
        diff = ((spec.head_keep != base.spec.head_keep).any(3) & valid).any(1).any(0)
        mine = spec.mlp_keep
        theirs = base.spec.mlp_keep
        if mine is not None or theirs is not None:
            ones = torch.ones(self.n, self.seq, self.net.n_layers, dtype=torch.bool, device=self.valid.device)
            mine = ones if mine is None else mine
            theirs = ones if theirs is None else theirs
            diff = diff | ((mine != theirs) & valid).any(1).any(0)
        return diff

    def start_layer(self, spec: KnockoutSpec, base: KnockoutRun | None) -> int:
        """The first layer where ``spec`` differs from ``base`` (``n_layers``: nowhere)."""
        diff = self._layer_diff(spec, base)
        nz = diff.nonzero()
        return int(nz[0, 0]) if len(nz) else self.net.n_layers

    def best_base(self, spec: KnockoutSpec, bases: Sequence[KnockoutRun]) -> tuple[KnockoutRun | None, int]:
        """The stored run (captured, same source) the spec can resume from latest, or the source."""
        best, start = None, self.start_layer(spec, None)
        for base in bases:
            if base.resid is None or base.source != spec.source or base.start >= self.net.n_layers:
                continue
            layer = self.start_layer(spec, base)
            if layer > start:
                best, start = base, layer
        return best, start

    def _rows_from(self, run: KnockoutRun | None, source: Source, layer: int, flat_rows: Tensor) -> Tensor:
        """Residual stream entering ``layer`` of ``run`` (``None``: the source) at ``flat_rows``."""
        out = self.stream(source).resid[layer].index_select(0, flat_rows)
        while run is not None and layer < run.start:  # below its start a run equals its base
            run = run.base
        if run is not None:  # at and after its start: its captured rows, the source elsewhere
            where = run.row_index[flat_rows]
            hit = where >= 0
            if bool(hit.any()):
                out[hit] = run.resid[layer - run.start][where[hit]]
        return out

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, specs: Sequence[KnockoutSpec], *, bases: Sequence[KnockoutRun] = ()) -> list[KnockoutRun]:
        """Run every spec (batched, chunked to the memory budget); results in spec order.

        Each spec resumes from the run in ``bases`` it agrees with longest (or from its source)."""
        parts = self._prompt_parts()
        if len(parts) > 1 and specs:
            return self._evaluate_parts(specs, bases, parts)
        return self._evaluate_here(specs, bases)

    # -- parallel prompt parts ------------------------------------------------------------------

    def _prompt_parts(self) -> list[tuple[int, int]]:
        """Contiguous prompt ranges ``[(first, end), ...]``, one per worker (see "Parallel prompt
        parts"): ``[(0, N)]`` unless ``parallel_prompts`` is on, the device a CPU and ``T > 1``.
        The cuts balance the rows up to END (the cost of a pass is about proportional to them;
        :func:`balanced_cuts`)."""
        workers = max(1, torch.get_num_threads()) if self.parallel_prompts and self.net.device.type == "cpu" else 1
        workers = min(workers, self.n)
        if workers <= 1:
            return [(0, self.n)]
        key = ("parts", workers)
        if key not in self._weight_cache:
            self._weight_cache[key] = balanced_cuts(self.valid.sum(1).cpu().tolist(), workers)
        return self._weight_cache[key]

    def _part_engine(self, first: int, end: int, sources: set) -> "KnockoutEngine":
        """This engine on prompts ``first .. end - 1``: views of its inputs and of its streams (which
        are built here first), its own FLOP counter, serial chunks, ``budget / parts`` of memory."""
        for source in sources:
            self.stream(source)
        if self.head_means is not None:
            self.mean_out(0)
        part = object.__new__(KnockoutEngine)
        part.__dict__.update(self.__dict__)
        part.n = end - first
        part.toks = self.toks[first:end]
        part.last, part.valid = self.last[first:end], self.valid[first:end]
        if self.ld_mode:
            part.end, part.io, part.s = self.end[first:end], self.io[first:end], self.s[first:end]
        part.head_means = None if self.head_means is None else self.head_means[first:end]
        part.mlp_means = None if self.mlp_means is None else self.mlp_means[first:end]
        part.parallel_prompts = part.parallel_chunks = False
        part.memory_budget_mb = max(1, self.memory_budget_mb * part.n // self.n)
        part.flops = FlopCounter()
        part._streams = {source: {"stream": self.stream(source).part(first, end, self.seq)} for source in sources}
        rows = slice(first * self.seq, end * self.seq)
        part._mean_out_holder = {} if self.head_means is None else {"out": [o[rows] for o in self._mean_out_holder["out"]]}
        part._ablated_holders = []
        return part

    @staticmethod
    def _spec_part(spec: KnockoutSpec, first: int, end: int) -> KnockoutSpec:
        return dataclasses.replace(spec, head_keep=spec.head_keep[first:end],
                                   mlp_keep=None if spec.mlp_keep is None else spec.mlp_keep[first:end])

    def _run_part(self, run: KnockoutRun | None, first: int, end: int) -> KnockoutRun | None:
        """``run`` on prompts ``first .. end - 1`` as a base for a part: its part when it was run in
        these parts, else a view of it (its captured rows, re-indexed); ``None`` when it cannot be
        resumed from there (run in other parts)."""
        if run is None:
            return None
        if run.parts is not None:
            return run.parts.get((first, end))
        base = None
        if run.base is not None:
            base = self._run_part(run.base, first, end)
            if base is None:
                return None
        S = self.seq
        view = KnockoutRun(spec=self._spec_part(run.spec, first, end), start=run.start, base=base,
                           ld=None if run.ld is None else run.ld[first:end],
                           logits=None if run.logits is None else run.logits[first:end])
        if run.resid is not None:
            view.row_index, view.resid = run.row_index[first * S : end * S], run.resid
        return view

    def _evaluate_parts(self, specs: Sequence[KnockoutSpec], bases: Sequence[KnockoutRun],
                        parts: list[tuple[int, int]]) -> list[KnockoutRun]:
        """:meth:`evaluate` with the prompts cut into ``parts``, each part's pass (its chunks in
        turn) on its own worker thread with one torch thread; the runs are joined along prompts
        (``ld``/``logits`` concatenated; captured rows kept per part, for later passes in the same
        parts)."""
        with one_torch_thread():  # small serial checks (see one_torch_thread)
            for spec in specs:
                self.check_spec(spec)
        sources = {spec.source for spec in specs}
        engines = [self._part_engine(first, end, sources) for first, end in parts]

        def run(index: int) -> list[KnockoutRun]:
            first, end = parts[index]
            part_bases = [b for b in (self._run_part(base, first, end) for base in bases) if b is not None]
            return engines[index]._evaluate_here([self._spec_part(spec, first, end) for spec in specs], part_bases)

        done = map_on_workers(run, list(range(len(parts))), len(parts))
        for engine in engines:
            for field in dataclasses.fields(FlopCounter):
                if field.name != "evaluated":
                    setattr(self.flops, field.name, getattr(self.flops, field.name) + getattr(engine.flops, field.name))
        self.flops.evaluated += len(specs)
        out = []
        with one_torch_thread():  # small joins (see one_torch_thread)
            for j, spec in enumerate(specs):
                pieces = [runs[j] for runs in done]
                run = KnockoutRun(spec=spec, start=min(p.start for p in pieces), base=None,
                                  parts=dict(zip(parts, pieces)) if spec.capture else None)
                if self.ld_mode:
                    run.ld = torch.cat([p.ld for p in pieces])
                else:
                    run.logits = torch.cat([p.logits for p in pieces])
                out.append(run)
        return out

    def _evaluate_here(self, specs: Sequence[KnockoutSpec], bases: Sequence[KnockoutRun]) -> list[KnockoutRun]:
        """:meth:`evaluate` on this engine's prompts at once (chunks serial, or in parallel)."""
        runs: list[KnockoutRun | None] = [None] * len(specs)
        groups: dict[tuple, list[tuple[int, KnockoutRun | None, int, Tensor]]] = collections.defaultdict(list)
        for index, spec in enumerate(specs):
            self.check_spec(spec)
            base, start = self.best_base(spec, bases)
            rows = self.changed_rows(spec)
            if start >= self.net.n_layers or not bool(rows.any()):
                runs[index] = self._unchanged(spec, base, start)
                continue
            # specs recomputing the same rows run together (a union of different windows would
            # recompute rows some of them do not need)
            key = (spec.source, rows.cpu().numpy().tobytes())
            groups[key].append((index, base, start, rows))
        workers = self._workers()
        work = [(source, members[0][3], chunk) for (source, _), members in groups.items()
                for chunk in self._chunks(members, members[0][3], specs, workers)]
        if workers > 1 and (len(work) > 1 or any(len(chunk) > 1 for _, _, chunk in work)):
            done = self._run_parallel(work, specs, workers)
        else:
            done = [self._run_chunk(source, rows, chunk, specs) for source, rows, chunk in work]
        for (_, _, chunk), chunk_runs in zip(work, done):
            for (index, _, _, _), run in zip(chunk, chunk_runs):
                runs[index] = run
        self.flops.evaluated += len(specs)
        return runs  # type: ignore[return-value]

    def _workers(self) -> int:
        """Chunks run at once: the torch thread count on a CPU (see the module doc), else 1."""
        if not self.parallel_chunks or self.net.device.type != "cpu":
            return 1
        return max(1, torch.get_num_threads())

    def _run_parallel(self, work: list, specs: Sequence[KnockoutSpec], workers: int) -> list[list[KnockoutRun]]:
        """``_run_chunk`` of every work item on ``workers`` threads, one torch thread each, largest
        first; a single chunk of several specs is split first so that every worker has one."""
        work_items = list(enumerate(work))
        while len(work_items) < workers:
            splittable = [item for item in work_items if isinstance(item[0], int) and len(item[1][2]) > 1]
            if not splittable:
                break
            j, (source, rows, chunk) = max(splittable, key=lambda item: len(item[1][2]))
            half = (len(chunk) + 1) // 2
            work_items = [item for item in work_items if item[0] != j]
            work_items += [((j, 0), (source, rows, chunk[:half])), ((j, 1), (source, rows, chunk[half:]))]
        for source in {item[1][0] for item in work_items}:
            self.stream(source)  # built once, before the workers read it
        if self.head_means is not None:
            self.mean_out(0)
        cost = lambda item: int(item[1][1].sum()) * len(item[1][2]) * (self.net.n_layers - min(m[2] for m in item[1][2]))  # noqa: E731
        ordered = sorted(work_items, key=cost, reverse=True)
        counters: list[FlopCounter] = []

        def run(item):
            _, (source, rows, chunk) = item
            worker = copy.copy(self)
            worker.flops = FlopCounter()  # merged below: no shared counter updates from threads
            counters.append(worker.flops)
            return worker._run_chunk(source, rows, chunk, specs)

        results = dict(zip((key for key, _ in ordered), map_on_workers(run, ordered, workers)))
        for counter in counters:
            for field in dataclasses.fields(FlopCounter):
                setattr(self.flops, field.name, getattr(self.flops, field.name) + getattr(counter, field.name))
        out = []
        for j in range(len(work)):
            out.append(results[j] if j in results else results[(j, 0)] + results[(j, 1)])
        return out

    def _unchanged(self, spec: KnockoutSpec, base: KnockoutRun | None, start: int) -> KnockoutRun:
        """A spec equal to its source (or base) wherever it matters."""
        stream = self.stream(spec.source)
        if base is not None:
            ld, logits = base.ld, base.logits
        else:
            ld, logits = stream.ld, stream.logits
        run = KnockoutRun(spec=spec, start=self.net.n_layers, base=base, ld=ld, logits=logits)
        if spec.capture:
            run.rows = torch.zeros(0, dtype=torch.long, device=self.valid.device)
            run.row_index = torch.full((self.n * self.seq,), -1, dtype=torch.long, device=self.valid.device)
            run.resid = []
            run.start = self.net.n_layers
            run.base = base
        return run

    def _chunks(self, members: list, rows: Tensor, specs: Sequence[KnockoutSpec], workers: int = 1) -> list[list]:
        net = self.net
        capture = any(specs[m[0]].capture for m in members)
        n_rows = int(rows.sum())
        width = max(net.d_mlp, 3 * net.hd, net.d_model)
        per_spec = 4 * (
            n_rows * (3 * net.d_model + 3 * net.hd)  # residual, LN output, projections
            + self.n * self.seq * 3 * net.hd * 2  # full-layout q/k/v and z
            + self.n * net.n_heads * self.seq * self.seq  # attention scores
            + (net.n_layers * n_rows * net.d_model if capture else 0)
        )
        fixed = 4 * min(n_rows, 1024) * width * 2
        budget = max(self.memory_budget_mb * 2**20 // max(1, workers) - fixed, per_spec)
        size = max(1, int(budget // per_spec))
        # members sorted by start layer: a chunk's specs join close together
        ordered = sorted(members, key=lambda m: m[2])
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def _weights(self, layer: int, heads: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``W_q``, ``b_q``, ``W_k|v``, ``b_k|v`` columns and ``W_O`` rows of ``heads`` (cached)."""
        net = self.net
        key = ("w", layer, tuple(heads.tolist()))
        hit = self._weight_cache.get(key)
        if hit is None:
            D, H, dh = net.d_model, net.n_heads, net.d_head
            # whole d_head blocks gathered per head (the same numbers as a per-column gather of
            # ``W_qkv``'s q columns / k|v columns and of ``W_O_flat``'s rows; 3-4x faster)
            W = net.W_qkv[layer].view(D, 3, H, dh)
            b = net.b_qkv[layer].view(3, H, dh)
            hit = (W[:, 0].index_select(1, heads).reshape(D, -1), b[0].index_select(0, heads).reshape(-1),
                   W[:, 1:].index_select(2, heads).reshape(D, -1), b[1:].index_select(1, heads).reshape(-1),
                   net.W_O_flat[layer].view(H, dh, D).index_select(0, heads).reshape(-1, D))
            self._weight_cache[key] = hit
        return hit

    @torch.no_grad()
    def _run_chunk(self, source: Source, rows_mask: Tensor, chunk: list, specs: Sequence[KnockoutSpec]) -> list[KnockoutRun]:
        net = self.net
        N, S, D, L, H, dh = self.n, self.seq, net.d_model, net.n_layers, net.n_heads, net.d_head
        device = rows_mask.device
        flops = self.flops
        flops.passes += 1
        n_idx, p_idx = rows_mask.nonzero(as_tuple=True)  # prompt-major
        flat = n_idx * S + p_idx
        r = len(flat)
        row_index = torch.full((N * S,), -1, dtype=torch.long, device=device)
        row_index[flat] = torch.arange(r, device=device)
        stream = self.stream(source)
        # END rows (LD mode): prompts whose END row is recomputed
        if self.ld_mode:
            end_flat = torch.arange(N, device=device) * S + self.end
            end_pos = row_index[end_flat]
            end_prompts = (end_pos >= 0).nonzero()[:, 0]
            end_rows = end_pos[end_prompts]
        members = [(specs[i], base, start) for i, base, start, _ in chunk]
        captures: list[list[Tensor]] = [[] for _ in members]
        head_keep = [spec.head_keep[n_idx, p_idx] for spec, _, _ in members]  # [r, L, H] each
        mlp_keep = [None if spec.mlp_keep is None else spec.mlp_keep[n_idx, p_idx] for spec, _, _ in members]
        order = sorted(range(len(members)), key=lambda j: members[j][2])
        joined: list[int] = []
        resid: Tensor | None = None
        first = members[order[0]][2]
        # per layer, the means at the recomputed rows: [r, H, dh]
        means_rows = None if self.head_means is None else self.head_means[n_idx, p_idx].unbind(1)
        # clean source (F(M\\K): long windows): full per-spec layouts; all-ablated source (F(C\\K): a
        # few rows per prompt): padded windows against the shared source keys
        layout = self._full_layout(flat, rows_mask, n_idx, p_idx) if source == "clean" else self._layout(n_idx, p_idx, rows_mask)
        trimmed = False
        for layer in range(first, L):
            # join the specs starting here
            new = [j for j in order if members[j][2] == layer]
            if new:
                parts = [self._rows_from(members[j][1], source, layer, flat)[None] for j in new]
                if trimmed:
                    parts = [p[:, end_rows] for p in parts]
                resid = torch.cat(([resid] if resid is not None else []) + parts, 0)
                joined += new
            assert resid is not None
            for slot, j in enumerate(joined):
                if members[j][0].capture:
                    captures[j].append(resid[slot].clone())
            last_layer = self.ld_mode and layer == L - 1
            keep = torch.stack([head_keep[j][:, layer] for j in joined])  # [k, r, H]
            resid = self._attention(layer, resid, keep, stream, means_rows, flat, layout, n_idx,
                                    end_prompts if last_layer else None, end_rows if last_layer else None)
            if last_layer:
                trimmed = True
            # MLP
            if not net.attn_only:
                rows_here = end_rows if trimmed else slice(None)
                ko = [mlp_keep[j] for j in joined]
                if any(m is not None and not bool(m[rows_here, layer].all()) for m in ko):
                    out = net.mlp(layer, resid)
                    keep_m = torch.stack([torch.ones(r, dtype=torch.bool, device=device) if m is None else m[:, layer]
                                          for m in ko])[:, rows_here]
                    means_m = self.mlp_means[n_idx, p_idx, layer][rows_here]
                    resid = resid + torch.where(keep_m[..., None], out, means_m[None])
                else:
                    resid = net.add_mlp_(layer, resid)
                flops.mlp += 4.0 * resid.shape[0] * resid.shape[1] * D * net.d_mlp
        # outputs, back in member order
        inverse = {j: slot for slot, j in enumerate(joined)}
        out_runs = []
        for j, (spec, base, start) in enumerate(members):
            final = resid[inverse[j]]
            run = KnockoutRun(spec=spec, start=start, base=base)
            if self.ld_mode:
                io, s = net.answer_logits(final, self.io[end_prompts], self.s[end_prompts])
                flops.unembed += 4.0 * len(end_prompts) * D
                ld = stream.ld.clone()
                ld[end_prompts] = (io - s).double()
                run.ld = ld
            else:
                full = stream.resid[L].clone()
                full[flat] = final
                run.logits = net.logits(full.view(N, S, D))
                flops.unembed += 2.0 * N * S * D * net.W_U.shape[1]
            if spec.capture:
                run.rows, run.row_index, run.resid = flat, row_index, captures[j]
            out_runs.append(run)
        return out_runs

    def _layout(self, n_idx: Tensor, p_idx: Tensor, rows_mask: Tensor) -> dict:
        """Packed rows in a padded per-prompt layout ``[N, W]`` and the attention masks (additive
        biases) of their queries: against the source rows (not recomputed, position <= the
        query's) and against the recomputed rows of the same prompt (position <= the query's)."""
        N, S = self.n, self.seq
        device = n_idx.device
        counts = rows_mask.sum(1)
        W = int(counts.max())
        offsets = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(n_idx), device=device) - offsets[n_idx]
        pos = torch.full((N, W), -1, dtype=torch.long, device=device)
        pos[n_idx, slot] = p_idx
        valid = pos >= 0
        positions = torch.arange(S, device=device)
        inf = float("-inf")
        dtype = self.net.W_E.dtype
        src_ok = (positions[None, None, :] <= pos[:, :, None]) & ~rows_mask[:, None, :]  # [N, W, S]
        src_ok = src_ok | ~valid[:, :, None]  # padding slots (never read) attend somewhere: no NaN
        win_ok = valid[:, None, :] & (pos[:, None, :] <= pos[:, :, None])  # [N, W, W]
        src_end = (positions[None, :] <= self.last[:, None]) & ~rows_mask if self.ld_mode else None  # [N, S]
        bias = lambda ok: torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, inf)  # noqa: E731
        pad_n, pad_w = (~valid).nonzero(as_tuple=True)
        return {"W": W, "slot": slot, "pad_n": pad_n, "pad_w": pad_w, "src": bias(src_ok), "win": bias(win_ok),
                "src_end": None if src_end is None else bias(src_end), "win_end": bias(valid)}

    def _full_layout(self, flat: Tensor, rows_mask: Tensor, n_idx: Tensor, p_idx: Tensor) -> dict:
        """The full ``[k, N * seq]`` key/value layout: every prompt's own key/value sequence per spec
        (the source stream's keys and values at rows that are not recomputed, the spec's at the
        recomputed ``flat`` rows). Queries sit in a padded per-prompt window (only the rows asked
        for; see :meth:`_query_window`). The buffers in ``"work"`` are reused by every layer of the
        chunk."""
        others = (~rows_mask).reshape(-1).nonzero()[:, 0]
        return {"full": True, "others": others, "work": {}, "n_idx": n_idx, "p_idx": p_idx}

    def _query_window(self, layout: dict, q_rows: Tensor, key: str) -> tuple[int, Tensor, Tensor]:
        """The padded query layout of packed rows ``q_rows`` (prompt-major): ``(Wq, dest, bias)``
        with ``Wq`` the most query rows of one prompt, ``dest`` each row's index in ``[N * Wq]``
        (prompt ``n``'s rows at ``n * Wq + 0, 1, ...``) and ``bias [N, Wq, seq]`` the causal
        attention bias (0 where the key's position is <= the query's, -inf elsewhere; padding slots
        attend to every key, so their never-read outputs stay finite). Cached under ``key``."""
        work = layout["work"]
        cache_key = ("queries", key)
        if cache_key not in work:
            N, S = self.n, self.seq
            n_q, p_q = layout["n_idx"][q_rows], layout["p_idx"][q_rows]
            device = n_q.device
            counts = torch.bincount(n_q, minlength=N)
            Wq = int(counts.max())
            slot = torch.arange(len(n_q), device=device) - (torch.cumsum(counts, 0) - counts)[n_q]
            dest = n_q * Wq + slot
            pos = torch.full((N * Wq,), S, dtype=torch.long, device=device)  # padding: every key
            pos[dest] = p_q
            allowed = torch.arange(S, device=device)[None, :] <= pos[:, None]  # [N * Wq, S]
            bias = torch.zeros(allowed.shape, dtype=self.net.W_E.dtype, device=device)
            bias.masked_fill_(~allowed, float("-inf"))
            work[cache_key] = (Wq, dest, bias.view(N, Wq, S))
        return work[cache_key]

    def _buffer(self, work: dict, name: str, shape: tuple, zero: bool) -> Tensor:
        """A buffer of ``work`` kept across layers (re-made when its shape changes); ``zero``: made
        as zeros (rows that are never written must stay finite)."""
        buf = work.get(name)
        if buf is None or tuple(buf.shape) != shape:
            make = torch.zeros if zero else torch.empty
            buf = work[name] = make(shape, dtype=self.net.W_E.dtype, device=self.net.device)
        return buf

    def _attend_full(self, layer: int, q: Tensor, kv: Tensor, stream: _Stream, active: Tensor, flat: Tensor,
                     layout: dict, q_rows: Tensor) -> Tensor:
        """Causal attention in the full layout -> ``z [k, len(q_rows), n_act, dh]`` at ``q_rows``.

        ``q [k, len(q_rows), n_act * dh]`` are the queries at packed rows ``q_rows`` (all recomputed
        rows, or only END rows in the last layer); ``kv [k, r, 2 * n_act * dh]`` the recomputed keys
        and values. With :attr:`WINDOW_QUERIES` (default) only those query rows are attended, in a
        padded per-prompt window against every key of the prompt with an explicit causal bias
        (:meth:`_query_window`); without it, every row of every prompt is attended with the fused
        causal kernel (query rows not asked for hold zeros or an earlier layer's queries: finite,
        never read). Same maths."""
        net = self.net
        N, S, dh = self.n, self.seq, net.d_head
        k = q.shape[0]
        n_act = len(active)
        w = n_act * dh
        work = layout["work"]
        k_max = max(k, work.get("k_max", 0))
        work["k_max"] = k_max
        kv_full = self._buffer(work, "kv", (k_max, N * S, 2 * w), zero=False)[:k]
        others = layout["others"]
        if others.numel():
            src = self._source_kv_rows(stream, layer, active, others)  # [n_others, 2, n_act, dh] (a view)
            kv_full.view(k, N * S, 2, n_act, dh).index_copy_(1, others, src.expand(k, -1, -1, -1, -1))
        kv_full.index_copy_(1, flat, kv)
        kvh = kv_full.view(k * N, S, 2, n_act, dh)
        keys, values = kvh[:, :, 0].transpose(1, 2), kvh[:, :, 1].transpose(1, 2)  # [kN, a, S, dh]
        scale = net.attn_scales[layer]
        if not self.WINDOW_QUERIES:
            q_full = self._buffer(work, "q", (k_max, N * S, w), zero=True)[:k]
            q_flat = flat[q_rows]
            q_full.index_copy_(1, q_flat, q)
            qh = q_full.view(k * N, S, n_act, dh).transpose(1, 2)
            z = F.scaled_dot_product_attention(qh, keys, values, is_causal=True, scale=scale)  # [kN, a, S, dh]
            z = z.transpose(1, 2).reshape(k, N * S, w)
            self.flops.attention += 4.0 * k * N * n_act * S * S * dh
            return z.index_select(1, q_flat).view(k, len(q_rows), n_act, dh)
        every_row = len(q_rows) == len(flat)
        Wq, dest, bias = self._query_window(layout, q_rows, "all" if every_row else "end")
        # zeros at the padding slots (written once; only the real rows are overwritten per layer)
        q_win = self._buffer(work, ("q", Wq), (k_max, N * Wq, w), zero=True)[:k]
        q_win.index_copy_(1, dest, q)
        mask_key = ("mask", Wq, k)
        if mask_key not in work:  # the bias per (spec, prompt) batch: [k N, 1, Wq, S]
            work[mask_key] = bias[None].expand(k, N, Wq, S).reshape(k * N, 1, Wq, S)
        qh = q_win.view(k * N, Wq, n_act, dh).transpose(1, 2)
        z = F.scaled_dot_product_attention(qh, keys, values, attn_mask=work[mask_key], scale=scale)  # [kN, a, Wq, dh]
        z = z.transpose(1, 2).reshape(k, N * Wq, w)
        self.flops.attention += 4.0 * k * N * n_act * Wq * S * dh
        return z.index_select(1, dest).view(k, len(q_rows), n_act, dh)

    def _source_kv_rows(self, stream: _Stream, layer: int, active: Tensor, rows: Tensor) -> Tensor:
        """The source stream's keys and values ``[len(rows), 2, n_act, d_head]`` of the ``active``
        heads at flat ``rows`` (one gather; possibly a strided view, never copied again)."""
        net = self.net
        kv = stream.qkv(layer).index_select(0, rows).view(len(rows), 3, net.n_heads, net.d_head)[:, 1:]
        return kv.index_select(2, active) if len(active) < net.n_heads else kv

    def _source_kv(self, stream: _Stream, layer: int, active: Tensor) -> tuple[Tensor, Tensor]:
        """The source stream's keys ``[N, n_act, d_head, S]`` and values ``[N, n_act, S, d_head]`` of
        the ``active`` heads (cached per layer and head set)."""
        net = self.net
        cache = stream.kv_cache
        key = (layer, tuple(active.tolist()))
        if key not in cache:
            kv = stream.qkv(layer).view(self.n, self.seq, 3, net.n_heads, net.d_head)[:, :, 1:, active]
            cache[key] = (kv[:, :, 0].permute(0, 2, 3, 1).contiguous(), kv[:, :, 1].permute(0, 2, 1, 3).contiguous())
        return cache[key]

    def _attention(self, layer: int, resid: Tensor, keep: Tensor, stream: _Stream, means_rows: Tensor | None,
                   flat: Tensor, layout: dict, n_idx: Tensor, end_prompts: Tensor | None,
                   end_rows: Tensor | None) -> Tensor:
        """``resid`` [k, r, D] -> ``resid_mid`` (at END rows only when ``end_rows`` is given).

        Only heads kept somewhere in the chunk are computed (the others output their means); their
        queries attend to the source stream's keys at rows that are not recomputed (shared by the
        chunk's specs) and to the recomputed keys of the same prompt."""
        net = self.net
        N, S, D, H, dh = self.n, self.seq, net.d_model, net.n_heads, net.d_head
        k, r = resid.shape[:2]
        flops = self.flops
        active = keep.any(1).any(0).nonzero()[:, 0]  # heads kept somewhere in this chunk
        n_act = len(active)
        if n_act == 0:
            mid = resid + self.mean_out(layer)[flat][None]
            return mid[:, end_rows] if end_rows is not None else mid
        all_heads = n_act == H
        W_q, b_q, W_kv, b_kv, W_O = self._weights(layer, active)
        w = n_act * dh
        x = net.ln(resid, net.ln1[layer])
        xq = x if end_rows is None else x[:, end_rows]
        q = net.linear(xq, W_q, b_q).view(k, -1, n_act, dh)  # [k, rq, n_act, dh]
        kv = net.linear(x, W_kv, b_kv)  # [k, r, 2 * n_act * dh]
        flops.qkv += 2.0 * D * w * (k * q.shape[1] + 2 * k * r)
        if layout.get("full"):
            q_rows = torch.arange(r, device=flat.device) if end_rows is None else end_rows
            z = self._attend_full(layer, q.view(k, -1, w), kv, stream, active, flat, layout, q_rows)
            rows = slice(None) if end_rows is None else end_rows
            if end_rows is not None:
                resid = resid[:, end_rows]
            return self._attn_out(layer, resid, z, keep, means_rows, flat, rows, active)
        kv = kv.view(k, r, 2, n_act, dh)
        src_kT, src_v = self._source_kv(stream, layer, active)  # [N, a, dh, S], [N, a, S, dh]
        W, slot = layout["W"], layout["slot"]
        # the recomputed keys/values in a padded [N, a, k, W, dh] layout (batched matmuls per prompt
        # and head, no permuted copies of the shared source keys)
        win = kv.new_empty(2, N, n_act, k, W, dh)
        win[:, n_idx, :, :, slot] = kv.permute(1, 2, 3, 0, 4)
        if layout["pad_n"].numel():  # padding slots: zeros (masked out, but must be finite)
            win[:, layout["pad_n"], :, :, layout["pad_w"]] = 0.0
        win_k, win_v = win[0], win[1]
        scale = net.attn_scales[layer]
        if end_rows is None:
            qp = q.new_zeros(N, n_act, k, W, dh) if layout["pad_n"].numel() else q.new_empty(N, n_act, k, W, dh)
            qp[n_idx, :, :, slot] = q.permute(1, 2, 0, 3)
            s_src = (qp.view(N, n_act, k * W, dh) @ src_kT).view(N, n_act, k, W, S) * scale + layout["src"][:, None, None]
            s_win = (qp @ win_k.transpose(-1, -2)) * scale + layout["win"][:, None, None]
        else:
            e = end_prompts
            qp = q.permute(1, 2, 0, 3)  # [a_e, n_act, k, dh]
            s_src = (qp @ src_kT[e]) * scale + layout["src_end"][e][:, None, None, :]  # [a_e, n_act, k, S]
            win_k, win_v = win_k[e], win_v[e]
            s_win = (qp[..., None, :] @ win_k.transpose(-1, -2))[..., 0, :] * scale + layout["win_end"][e][:, None, None, :]
        top = torch.maximum(s_src.amax(-1, keepdim=True), s_win.amax(-1, keepdim=True))
        e_src = (s_src - top).exp_()
        e_win = (s_win - top).exp_()
        denom = e_src.sum(-1, keepdim=True) + e_win.sum(-1, keepdim=True)
        if end_rows is None:
            z = (e_src.view(N, n_act, k * W, S) @ src_v).view(N, n_act, k, W, dh) + e_win @ win_v
            z = (z / denom)[n_idx, :, :, slot].permute(2, 0, 1, 3)  # [k, r, n_act, dh]
            rows = slice(None)
            flops.attention += 4.0 * N * n_act * k * W * (S + W) * dh
        else:
            z = (e_src @ src_v[end_prompts]) + (e_win[..., None, :] @ win_v)[..., 0, :]
            z = (z / denom).permute(2, 0, 1, 3)  # [k, a_e, n_act, dh], END rows in end_rows order
            rows = end_rows
            resid = resid[:, end_rows]
            flops.attention += 4.0 * len(end_prompts) * n_act * k * (S + W) * dh
        return self._attn_out(layer, resid, z, keep, means_rows, flat, rows, active)

    def _attn_out(self, layer: int, resid: Tensor, z: Tensor, keep: Tensor, means_rows: Tensor | None,
                  flat: Tensor, rows, active: Tensor) -> Tensor:
        """``resid + attn_out`` at ``rows`` (``resid`` already restricted to them): the ``active``
        heads' ``z [k, r', n_act, dh]`` where kept, their means where ablated; every other head
        outputs its mean."""
        net = self.net
        D, H, dh = net.d_model, net.n_heads, net.d_head
        k = z.shape[0]
        n_act = len(active)
        all_heads, w = n_act == H, n_act * dh
        W_O = self._weights(layer, active)[4]
        flops = self.flops
        keep_act = keep[:, rows] if all_heads else keep[:, rows][..., active]  # [k, r', n_act]
        r_out = resid.shape[1]
        if all_heads:
            z = z.contiguous()
            ablated = ~keep_act
            if means_rows is not None and bool(ablated.any()):  # few (row, head) pairs: index them
                z[ablated] = means_rows[layer][rows].expand(k, -1, -1, -1)[ablated]
            flops.attn_out += 2.0 * k * r_out * H * dh * D
            out = torch.addmm(resid.reshape(-1, D), z.view(-1, H * dh), W_O).add_(net.b_O[layer])
            return out.view(k, r_out, D)
        means_act = means_rows[layer][rows][:, active]
        delta = torch.where(keep_act[..., None], z - means_act[None], torch.zeros((), device=z.device))
        base = self.mean_out(layer)[flat[rows]]
        flops.attn_out += 2.0 * k * r_out * w * D
        out = (resid + base[None]).reshape(-1, D)
        out.addmm_(delta.reshape(-1, w), W_O)
        return out.view(k, r_out, D)
