"""Circuit evaluation (paper §4, App. M; Figs. 6, 7, 20): faithfulness, completeness, minimality.

All three are knockouts with template-wise mean ablation (:mod:`ioi.ablation`): every replaced head
output ``z`` becomes its mean over the p_ABC prompts of the same template (``ctx.abc`` grouped by
``ctx.ioi.groups``), per position. The means are computed **once per experiment** and reused by
every evaluation. MLPs, LayerNorms and embeddings are never ablated. The metric is the per-prompt
logit difference ``LD = logit(IO) - logit(S)`` at each prompt's END; every F below is the mean of
the per-prompt LDs (so F(C)/F(M) is a ratio of means).

* F(M): the model, nothing ablated.
* F(C): every head at every position mean-ablated except the circuit heads at their relevant
  positions (``Circuit.relevant_positions``: name movers / backups / negatives / S-inhibition at
  END, induction and duplicate token heads at S2, previous token heads at S1+1).
* F(C\\K): K's heads leave the circuit and are ablated at every position, like non-circuit heads.
* F(M\\K): only K's heads are ablated, only at their relevant positions (the paper code's
  completeness asymmetry, ioi_paper.md §1.4); everything else runs clean.

Experiments:

* ``faithfulness``: F(M), F(C), F(C)/F(M), |F(M) - F(C)| for the model's circuit and for its naive
  circuit (the paper's ``NAIVE`` for the paper circuit; otherwise the circuit without its backup and
  negative name movers), paired-bootstrap CIs over prompts, the per-template ratio, and the spread of
  the ratio over ``N_EXTRA_SEEDS`` regenerated datasets (p_IOI with seed+1.. and its p_ABC).
* ``completeness`` (Fig. 6): (x, y) = (F(C\\K), F(M\\K)) for K = ∅, each class, ``N_RANDOM_SETS``
  uniformly random subsets, a greedy search and the four greedy sets of the paper's Fig. 22
  (evaluated as given, paper circuit only: a check of "incompleteness up to 3.09" that does not
  depend on the search); the incompleteness of K is |x - y|. For K, the "name mover" class merges
  the name movers and the backup name movers, as the paper code's ``CIRCUIT["name mover"]`` does.
  Greedy rules (``GREEDY_RULE``): ``"paper_code"`` (default; the paper code's
  ``completeness.py::new_greedy_search``, which produced Fig. 6): each run starts from K = ∅ and
  ``old = |F(C) - F(M)|``; each step samples candidates from C\\K, and the best K ∪ {v} is taken
  only if its incompleteness exceeds ``old`` (then ``old`` becomes it), otherwise K is unchanged and
  the next step samples afresh; Fig. 6 plots each run's FINAL set. ``"algorithm3"`` (the printed
  Algorithm 3, App. M): every step adds the best candidate, and every intermediate set is a point.
* ``minimality`` (Figs. 7, 20): for each circuit head v with K(v) from
  :func:`ioi.circuits.minimality_k_sets`, score(v) = |F(C\\(K∪{v})) - F(C\\K)|, also as a fraction
  of F(M).

Speed: every evaluation runs on the batched plain-tensor knockout engine
(:mod:`ioi.ablation_engine`; the hooked twin :mod:`ioi.ablation_reference` is tested equal to
1e-4): each greedy iteration's candidates, the class and random sets, and minimality's sets are
each one batched pass; only the LD at END is computed; F(C\\K) recomputes only the rows where a
circuit head is kept (the others equal the all-ablated run) and only the kept heads' q/k/v;
F(M\\K) recomputes only each prompt's window from the first ablated position to END; a set K ∪ {v}
resumes from K's stored run at v's layer.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ioi._threads import one_torch_thread
from ioi.ablation import circuit_keep_mask, circuit_positions, compute_template_means
from ioi.ablation_engine import KnockoutEngine, KnockoutSpec
from ioi.circuits import (
    BACKUP_NAME_MOVER,
    NAIVE_CIRCUIT,
    NAME_MOVER,
    NEGATIVE_NAME_MOVER,
    PAPER_GREEDY_SETS,
    Circuit,
    minimality_k_sets,
)
from ioi.experiments.attribution import circuit_summary, finite, head_key
from ioi.experiments.core import ExperimentResult, RunContext, batch_size_for
from ioi.paper_values import (  # noqa: F401  (re-exported)
    PAPER_COMPLETENESS_POINTS,
    PAPER_COMPLETENESS_SOURCE,
    PAPER_COMPLETENESS_TEXT,
    PAPER_FAITHFULNESS,
    PAPER_FIG20,
    PAPER_FIG20_SOURCE,
)
from ioi.stats import bootstrap_ci, bootstrap_ratio_ci

Head = tuple[int, int]

N_BOOTSTRAP = 1000

# Faithfulness: datasets regenerated with seed+1 .. seed+N_EXTRA_SEEDS for the seed spread.
N_EXTRA_SEEDS = 3

# Completeness (Fig. 6; paper App. M and the paper code's new_greedy_search: 10 runs x 10
# iterations, 10 candidates per step for the full circuit and 5 for the naive one; 100 random sets
# in the released data). The counts are recorded in the summary.
N_RANDOM_SETS = 20
GREEDY_RUNS = 10  # the paper's (App. M) and its code's run count


def greedy_runs(ctx: RunContext) -> int:
    """The greedy search's run count: the config's ``greedy_runs`` when set, else the paper's 10
    (``GREEDY_RUNS``). The cost is linear in it; a 2-core CPU user sets 2 to finish in minutes."""
    return GREEDY_RUNS if ctx.greedy_runs is None else int(ctx.greedy_runs)
GREEDY_ITERATIONS = 10  # bounded by the circuit size
GREEDY_CANDIDATES = {"full": 10, "naive": 5}
GREEDY_KEEP = 5  # sets with the largest incompleteness reported in ``greedy_sets``
# "paper_code": accept the best candidate only if it beats the current incompleteness, plot each
# run's final set (what produced Fig. 6). "algorithm3": the printed Algorithm 3, always add the best
# candidate, every intermediate set is a point.
GREEDY_RULES = ("paper_code", "algorithm3")
GREEDY_RULE = "paper_code"

# ------------------------------------------------------------------------------------------------
# What the paper reports (GPT-2 small). Only drawn / compared for the paper circuit.
# ------------------------------------------------------------------------------------------------



PAPER_FIG20_K_TEXT = {
    "11.2": "all previous NMs and backup NMs", "10.6": "all previous NMs and backup NMs",
    "10.10": "all previous NMs and backup NMs", "10.2": "all previous NMs and backup NMs",
    "9.7": "all previous NMs and backup NMs", "10.1": "all previous NMs and backup NMs",
    "11.9": "all name movers and negative heads", "9.0": "all name movers and negative heads",
}


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def heads_key(heads: Iterable[Head]) -> list[str]:
    """Heads as sorted ``"layer.head"`` strings."""
    return [head_key(*h) for h in sorted({tuple(map(int, h)) for h in heads})]


def heads_text(heads: Iterable[Head]) -> str:
    """``"{9.9, 10.0}"`` (braces so that a CSV reader never takes one head for a number)."""
    return "{" + ", ".join(heads_key(heads)) + "}"


def ci_list(low_high) -> list[float | None]:
    return [finite(low_high[0]), finite(low_high[1])]


def mean_ci(values, seed: int) -> list[float | None]:
    return ci_list(bootstrap_ci(np.asarray(values, dtype=float), n_resamples=N_BOOTSTRAP, seed=seed))


def mean_and_ci(key: str, values, seed: int) -> dict[str, Any]:
    """``{key: mean over prompts, key + "_ci": its 95% percentile bootstrap CI}``, JSON-safe."""
    return {key: finite(np.asarray(values, dtype=float).mean()), f"{key}_ci": mean_ci(values, seed)}


def abs_mean_diff_ci(a, b, seed: int) -> list[float | None]:
    """95% paired-bootstrap CI of ``|mean(a) - mean(b)|`` (prompts resampled jointly)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return ci_list(bootstrap_ci(diff, statistic=lambda d: abs(d.mean()), n_resamples=N_BOOTSTRAP, seed=seed))


def naive_circuit_for(circuit: Circuit) -> Circuit:
    """The paper's ``NAIVE`` circuit for the paper circuit; otherwise ``circuit`` without its backup
    and negative name movers (the naive circuit's definition, paper §4.3)."""
    if circuit.name == "paper":
        return NAIVE_CIRCUIT
    classes = {cls: tuple(heads) for cls, heads in circuit.classes.items()
               if cls not in (BACKUP_NAME_MOVER, NEGATIVE_NAME_MOVER) and heads}
    return Circuit(name=f"{circuit.name}-naive", classes=classes,
                   relevant_positions=dict(circuit.relevant_positions))


def knockout_classes(circuit: Circuit) -> dict[str, tuple[Head, ...]]:
    """K sets by class for completeness: the circuit's classes, with the backup name movers merged
    into "name mover" (paper code ``CIRCUIT["name mover"]`` = the 3 name movers + 8 backups)."""
    out: dict[str, tuple[Head, ...]] = {}
    for cls in circuit.class_names():
        heads = tuple(tuple(map(int, h)) for h in circuit.classes[cls])
        if not heads:
            continue
        target = NAME_MOVER if cls == BACKUP_NAME_MOVER else cls
        out[target] = out.get(target, ()) + tuple(h for h in heads if h not in out.get(target, ()))
    return out


def compute_means(model, ctx: RunContext, ioi=None, abc=None) -> torch.Tensor:
    """Template-wise means of every head's ``z`` over p_ABC, per prompt of p_IOI (computed once)."""
    ioi = ctx.ioi if ioi is None else ioi
    abc = ctx.abc if abc is None else abc
    step = batch_size_for(model, abc.max_len, ctx.memory_budget_mb)
    return compute_template_means(model, abc.toks, ioi.groups, batch_size=step)


def is_paper_circuit(circuit: Circuit) -> bool:
    return circuit.name == "paper"


# ------------------------------------------------------------------------------------------------
# Fast per-prompt LD under head ablations
# ------------------------------------------------------------------------------------------------


# model -> whether the stop-at-unembedding shortcut matched a plain forward pass on it.
_FAST_PATH_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _StopForward(Exception):
    """Raised from the unembedding-input hook: nothing after it is needed."""


def _device(model) -> torch.device:
    return model.W_U.device


class EndLogitDiff:
    """Per-prompt LD at END on one dataset, with arbitrary forward hooks, chunked by prompts.

    ``run(hooks_for_rows)`` takes a callable ``rows (slice) -> [(hook name, fn)]`` (so per-prompt
    hooks can be sliced per chunk) and returns a float64 CPU tensor ``[N]``. With
    ``start_layer > 0`` the run resumes from ``prefix[start_layer]`` (the residual stream entering
    that block, ``[N, seq, d_model]``). ``capture_prefix=True`` also returns the residual stream
    entering every block (for later resumes).
    """

    def __init__(self, model, dataset, *, memory_budget_mb: int = 2048, fast: bool = True):
        self.model = model
        device = _device(model)
        self.end = dataset.word_idx["END"].to(device)
        self.seq = int(self.end.max()) + 1  # nothing after the last END is read
        self.toks = dataset.toks[:, : self.seq].to(device)
        self.io = dataset.io_token_ids.to(device)
        self.s = dataset.s_token_ids.to(device)
        self.n = len(dataset)
        self.step = batch_size_for(model, self.seq, memory_budget_mb)
        self.n_layers = model.cfg.n_layers
        self.fast = fast
        self._direction = None
        if fast:
            if model not in _FAST_PATH_CHECKED:
                _FAST_PATH_CHECKED[model] = self._check_fast_path()
            self.fast = _FAST_PATH_CHECKED[model]

    # -- the LD from the unembedding input --------------------------------------------------------
    def _answer_direction(self):
        if self._direction is None:
            W_U = self.model.W_U
            b_U = getattr(self.model, "b_U", None)
            direction = (W_U[:, self.io] - W_U[:, self.s]).T  # [N, d_model]
            bias = torch.zeros(self.n, device=W_U.device) if b_U is None else b_U[self.io] - b_U[self.s]
            self._direction = (direction, bias)
        return self._direction

    def _forward_chunk(self, inputs, hooks, rows: slice, start_layer: int, capture_prefix: bool):
        """LD of one chunk of prompts (and the residual stream entering every block)."""
        captured: dict[str, torch.Tensor] = {}
        prefix: list[torch.Tensor | None] = [None] * self.n_layers

        def keep_prefix(layer):
            def hook(x, hook):
                prefix[layer] = x.detach().clone()
                return x
            return hook

        def unembed_in(x, hook):
            captured["x"] = x
            raise _StopForward

        fwd = list(hooks)
        if capture_prefix:
            fwd += [(f"blocks.{l}.hook_resid_pre", keep_prefix(l)) for l in range(start_layer, self.n_layers)]
        end = self.end[rows]
        idx = torch.arange(end.shape[0], device=end.device)
        kwargs = {"start_at_layer": start_layer} if start_layer > 0 else {}
        if self.fast:
            fwd.append(("unembed.hook_in", unembed_in))
            try:
                self.model.run_with_hooks(inputs, fwd_hooks=fwd, **kwargs)
            except _StopForward:
                pass
            if "x" not in captured:
                raise RuntimeError("the unembedding-input hook did not fire")
            direction, bias = self._answer_direction()
            x = captured["x"][idx, end].float()
            ld = (x * direction[rows].float()).sum(-1) + bias[rows].float()
        else:
            logits = self.model.run_with_hooks(inputs, fwd_hooks=fwd, **kwargs)
            at_end = logits[idx, end].float()
            ld = at_end[idx, self.io[rows]] - at_end[idx, self.s[rows]]
        return ld.double().cpu(), prefix

    def run(self, hooks_for_rows: Callable[[slice], list] | None = None, *, start_layer: int = 0,
            prefix: Sequence[torch.Tensor] | None = None, capture_prefix: bool = False):
        lds, prefixes = [], []
        for start in range(0, self.n, self.step):
            rows = slice(start, min(self.n, start + self.step))
            inputs = self.toks[rows] if start_layer == 0 else prefix[start_layer][rows]
            hooks = hooks_for_rows(rows) if hooks_for_rows is not None else []
            ld, pre = self._forward_chunk(inputs, hooks, rows, start_layer, capture_prefix)
            lds.append(ld)
            prefixes.append(pre)
        ld = torch.cat(lds)
        if not capture_prefix:
            return ld
        merged = [None if prefixes[0][l] is None else torch.cat([p[l] for p in prefixes])
                  for l in range(self.n_layers)]
        return ld, merged

    def _check_fast_path(self) -> bool:
        """The stop-at-unembedding shortcut against a plain forward pass on a few prompts (once per
        model: the result is remembered in ``_FAST_PATH_CHECKED``)."""
        rows = slice(0, min(self.n, self.step, 8))
        fast, _ = self._forward_chunk(self.toks[rows], [], rows, 0, False)
        self.fast = False
        slow, _ = self._forward_chunk(self.toks[rows], [], rows, 0, False)
        scale = max(1.0, float(slow.abs().max()))
        return bool(torch.allclose(fast, slow, atol=1e-3 * scale, rtol=0))


class KnockoutEvaluator:
    """F(C), F(C\\K), F(M\\K), F(M) per prompt for one circuit (positions per head), one dataset and
    one set of means, with results cached by K.

    ``positions``: ``{(layer, head): per-prompt positions or None (= every position)}``, e.g.
    :func:`ioi.ablation.circuit_positions`. ``clean``: the :class:`CleanRun` of the dataset (its
    clean stream is shared by every evaluator on that dataset).

    Runs on the batched plain-tensor engine (:class:`ioi.ablation_engine.KnockoutEngine`):
    :meth:`prefetch` evaluates many sets K in one batched pass; :meth:`without` /
    :meth:`model_without` return cached values (evaluating a missing K on its own). Each set
    resumes from the stored run of a subset of it (e.g. K ∪ {v} from K at v's layer; F(C) and the
    clean run for the first sets); the runs of the last few sets are kept for that
    (``resume_memory_mb``).
    """

    def __init__(self, clean: "CleanRun", means: torch.Tensor, positions: Mapping[Head, Any],
                 resume_memory_mb: int | None = None):
        self.clean = clean
        self.engine = clean.engine.with_means(head_means=means)
        self.means = self.engine.head_means
        self.positions = {tuple(map(int, h)): p for h, p in positions.items()}
        net = self.engine.net
        self._shape = (self.engine.n, self.engine.seq, net.n_layers, net.n_heads)
        self._keep_circuit = circuit_keep_mask(self.positions, *self._shape, device=net.device)
        self._values: dict[tuple[str, frozenset], torch.Tensor] = {}
        self._runs: "collections.OrderedDict[tuple[str, frozenset], Any]" = collections.OrderedDict()
        budget = clean.memory_budget_mb if resume_memory_mb is None else resume_memory_mb
        self._resume_bytes = int(budget) * 2**20 // 4
        run = self.engine.evaluate([self._spec("C", frozenset())])[0]
        self._pinned = {("C", frozenset()): run}
        self.f_circuit = run.ld.cpu()
        self.f_model = clean.f_model
        self.n_forward = 1

    def _spec(self, kind: str, knockout: frozenset) -> KnockoutSpec:
        """F(C\\K) (K ablated at every position, the other circuit heads kept at theirs; source: the
        all-ablated stream) or F(M\\K) (only K ablated, at its positions; source: the clean run)."""
        if kind != "C":
            missing = [h for h in knockout if h not in self.positions]
            if missing:
                raise ValueError(f"Heads {missing} are not in the circuit (no relevant position).")
        # K as a [layer, head] mask, broadcast over prompts and positions: one full-size op per
        # spec (the main thread builds every spec of a pass between parallel passes)
        in_k = torch.zeros(self._shape[2:], dtype=torch.bool, device="cpu")  # filled on the host, then moved once
        for layer, head in knockout:
            in_k[layer, head] = True
        in_k = in_k.to(self._keep_circuit.device)
        if kind == "C":  # the circuit's mask with K's heads ablated everywhere
            return KnockoutSpec(head_keep=self._keep_circuit & ~in_k, source="ablated", capture=True)
        # every head kept except K's at their positions (the circuit's mask of each head, negated)
        keep = torch.logical_and(self._keep_circuit, in_k).logical_not_()
        return KnockoutSpec(head_keep=keep, source="clean", capture=True)

    def _bases(self, kind: str, knockouts: Sequence[frozenset]) -> list:
        """Stored runs that are a subset of some requested K (the ones worth resuming from)."""
        stored = [(k, run) for (kd, k), run in list(self._pinned.items()) + list(self._runs.items()) if kd == kind]
        return [run for k, run in stored if any(k <= t for t in knockouts)]

    def prefetch(self, knockouts: Iterable[Iterable[Head]], kinds: Sequence[str] = ("C", "M")) -> None:
        """Evaluate F(C\\K) and F(M\\K) for every K (not yet cached) in one batched pass each."""
        sets = list(dict.fromkeys(frozenset(tuple(map(int, h)) for h in k) for k in knockouts))
        sets = [k for k in sets if k]
        for kind in kinds:
            todo = [k for k in sets if (kind, k) not in self._values]
            if not todo:
                continue
            with one_torch_thread():  # small mask ops between passes (see one_torch_thread)
                specs = [self._spec(kind, k) for k in todo]
            runs = self.engine.evaluate(specs, bases=self._bases(kind, todo))
            with one_torch_thread():
                values = torch.stack([run.ld for run in runs]).cpu()  # one device -> host copy, not one per K
            for k, run, value in zip(todo, runs, values.unbind(0)):
                self._values[(kind, k)] = value
                self._remember((kind, k), run)
            self.n_forward += len(todo)

    def _remember(self, key, run) -> None:
        self._runs[key] = run
        self._runs.move_to_end(key)
        total = sum(r.nbytes() for r in self._runs.values())
        while len(self._runs) > 1 and total > self._resume_bytes:
            _, old = self._runs.popitem(last=False)
            total -= old.nbytes()

    def without(self, knockout: Iterable[Head]) -> torch.Tensor:
        """F(C\\K) per prompt: K's heads leave the circuit (ablated at every position)."""
        k = frozenset(tuple(map(int, h)) for h in knockout)
        if not k:
            return self.f_circuit
        self.prefetch([k], kinds=("C",))
        return self._values[("C", k)]

    def model_without(self, knockout: Iterable[Head]) -> torch.Tensor:
        """F(M\\K) per prompt: only K's heads ablated, only at their relevant positions."""
        k = frozenset(tuple(map(int, h)) for h in knockout)
        if not k:
            return self.f_model
        self.prefetch([k], kinds=("M",))
        return self._values[("M", k)]


@dataclasses.dataclass
class CleanRun:
    """The clean run of one dataset: F(M) per prompt and the knockout engine on its prompts (whose
    clean stream every :class:`KnockoutEvaluator` on that dataset shares)."""

    engine: KnockoutEngine
    f_model: torch.Tensor
    memory_budget_mb: int

    @classmethod
    def build(cls, model, dataset, *, memory_budget_mb: int, resumable: bool = True) -> "CleanRun":
        """``resumable`` is accepted for compatibility (runs are always resumable now)."""
        engine = KnockoutEngine(model, dataset.toks, end=dataset.word_idx["END"], io_ids=dataset.io_token_ids,
                                s_ids=dataset.s_token_ids, memory_budget_mb=memory_budget_mb)
        f_model = engine.stream("clean").ld.cpu()
        return cls(engine=engine, f_model=f_model, memory_budget_mb=int(memory_budget_mb))

    def evaluator(self, means, circuit: Circuit | Mapping[Head, Any], dataset) -> KnockoutEvaluator:
        positions = circuit_positions(circuit, dataset.word_idx) if isinstance(circuit, Circuit) else circuit
        return KnockoutEvaluator(self, means, positions)


def _prompt_frame(dataset, **columns) -> pd.DataFrame:
    return pd.DataFrame({"prompt": np.arange(len(dataset)), "template": dataset.template_ids, **columns})


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _progress(ctx: RunContext, iterable, **kwargs):
    return tqdm(iterable, disable=not ctx.progress, **kwargs)


def _is_gpt2_shaped(model) -> bool:
    return model.cfg.n_layers == 12 and model.cfg.n_heads == 12


# ------------------------------------------------------------------------------------------------
# Faithfulness
# ------------------------------------------------------------------------------------------------


def _faithfulness_values(f_m: np.ndarray, f_c: np.ndarray, seed: int, suffix: str) -> dict[str, Any]:
    ratio = f_c.mean() / f_m.mean()
    gap = abs(f_m.mean() - f_c.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        per_prompt = f_c / f_m
    per_prompt = per_prompt[np.isfinite(per_prompt)]
    return {
        f"faithfulness_ratio{suffix}": finite(ratio),
        f"faithfulness_ratio{suffix}_ci": ci_list(bootstrap_ratio_ci(f_c, f_m, n_resamples=N_BOOTSTRAP, seed=seed)),
        f"faithfulness_gap{suffix}": finite(gap),
        f"faithfulness_gap{suffix}_ci": abs_mean_diff_ci(f_m, f_c, seed),
        f"faithfulness_ratio_per_prompt_mean{suffix}": finite(per_prompt.mean()) if per_prompt.size else None,
        **mean_and_ci(f"F_C{suffix}", f_c, seed),
    }


def _faithfulness_breakdown(ioi, f_m: np.ndarray, f_c: np.ndarray, f_naive: np.ndarray, seed: int) -> dict[str, Any]:
    """F(M), F(C) and F(C)/F(M) (full and naive circuit) per template and per order."""
    from ioi.breakdown import breakdown_mean, breakdown_ratio, group_labels

    labels = group_labels(ioi)
    return {
        "F_M": breakdown_mean(f_m, labels, seed=seed, definition="mean LD of the model over the group"),
        "F_C": breakdown_mean(f_c, labels, seed=seed, definition="mean LD of the circuit over the group"),
        "faithfulness_ratio": breakdown_ratio(f_c, f_m, labels, seed=seed,
                                              definition="mean F(C) / mean F(M) within the group"),
        "faithfulness_ratio_naive": breakdown_ratio(f_naive, f_m, labels, seed=seed,
                                                    definition="naive circuit: mean F(C) / mean F(M) within the group"),
    }


def _extra_seed_datasets(ctx: RunContext, seed: int):
    """p_IOI regenerated with another seed and the same settings as ``ctx.ioi``, and its p_ABC."""
    from ioi.data import IOIDataset

    base = ctx.ioi
    st = base.settings
    ioi = IOIDataset(
        prompt_type=st.prompt_type if isinstance(st.prompt_type, str) else list(st.prompt_type),
        N=len(base), seed=seed, tokenizer=base.tokenizer, prepend_bos=st.prepend_bos,
        all_templates=st.all_templates, names=st.names, places=st.places, objects=st.objects,
        symmetric=st.symmetric, unique=st.unique, distinct_names=st.distinct_names,
    )
    abc = ioi.abc_dataset(paper_collisions=bool(ctx.dataset_settings.get("paper_collisions", False)))
    return ioi, abc


def faithfulness(model, ctx: RunContext) -> ExperimentResult:
    """F(M), F(C), F(C)/F(M) and |F(M) - F(C)| for the model's circuit and its naive circuit."""
    circuit = ctx.circuit_for(model)
    naive = naive_circuit_for(circuit)
    naive.validate(model.cfg.n_layers, model.cfg.n_heads)
    rows, per_seed = [], []
    summary: dict[str, Any] = {}
    base_seed = int(ctx.ioi.seed)
    seeds = [base_seed] + [base_seed + k for k in range(1, N_EXTRA_SEEDS + 1)]
    for index, seed in enumerate(_progress(ctx, seeds, desc="faithfulness (dataset seeds)")):
        ioi, abc = (ctx.ioi, ctx.abc) if index == 0 else _extra_seed_datasets(ctx, seed)
        means = compute_means(model, ctx, ioi, abc)
        # two circuit runs only: nothing to resume, so no residual-stream cache
        clean = CleanRun.build(model, ioi, memory_budget_mb=ctx.memory_budget_mb, resumable=False)
        f_m = _np(clean.f_model)
        f_c = _np(clean.evaluator(means, circuit, ioi).f_circuit)
        f_naive = _np(clean.evaluator(means, naive, ioi).f_circuit)
        rows.append(_prompt_frame(ioi, dataset_seed=seed, main=index == 0, F_M=f_m, F_C=f_c,
                                  F_C_naive=f_naive))
        per_seed.append({"seed": seed, "F_M": finite(f_m.mean()), "F_C": finite(f_c.mean()),
                         "F_C_naive": finite(f_naive.mean()),
                         "faithfulness_ratio": finite(f_c.mean() / f_m.mean()),
                         "faithfulness_gap": finite(abs(f_m.mean() - f_c.mean())),
                         "faithfulness_ratio_naive": finite(f_naive.mean() / f_m.mean()),
                         "faithfulness_gap_naive": finite(abs(f_m.mean() - f_naive.mean()))})
        if index == 0:
            summary.update(_faithfulness_values(f_m, f_c, ctx.seed, ""))
            summary.update(_faithfulness_values(f_m, f_naive, ctx.seed, "_naive"))
            summary["F_M"] = finite(f_m.mean())
            summary["F_M_ci"] = mean_ci(f_m, ctx.seed)
            gaps = np.stack([f_m, f_c, f_naive], 1)
            summary["naive_minus_full_gap_abs"] = finite(
                abs(abs(f_m.mean() - f_naive.mean()) - abs(f_m.mean() - f_c.mean())))
            summary["naive_minus_full_gap_abs_ci"] = ci_list(bootstrap_ci(
                gaps, n_resamples=N_BOOTSTRAP, seed=ctx.seed,
                statistic=lambda a: abs(abs((a[:, 0] - a[:, 2]).mean()) - abs((a[:, 0] - a[:, 1]).mean()))))
            frame = rows[0]
            by_template = {}
            for template, part in frame.groupby("template", sort=True):
                by_template[str(template)] = {
                    "n": int(len(part)),
                    "F_M": finite(part["F_M"].mean()),
                    "F_C": finite(part["F_C"].mean()),
                    "F_C_naive": finite(part["F_C_naive"].mean()),
                    "faithfulness_ratio": finite(part["F_C"].mean() / part["F_M"].mean()),
                    "faithfulness_ratio_naive": finite(part["F_C_naive"].mean() / part["F_M"].mean()),
                }
            summary["by_template"] = by_template
            summary["breakdown"] = _faithfulness_breakdown(ioi, f_m, f_c, f_naive, ctx.seed)
        del means, clean
    ratios = np.array([s["faithfulness_ratio"] for s in per_seed], dtype=float)
    summary.update({
        "seeds": per_seed,
        "faithfulness_ratio_seeds": [finite(r) for r in ratios],
        "faithfulness_ratio_seed_mean": finite(ratios.mean()),
        "faithfulness_ratio_seed_std": finite(ratios.std(ddof=1)) if len(ratios) > 1 else None,
        "faithfulness_gap_seed_std": finite(np.std([s["faithfulness_gap"] for s in per_seed], ddof=1))
        if len(per_seed) > 1 else None,
        "n_extra_seeds": N_EXTRA_SEEDS,
        "ratio_definition": "ratio of means: mean_i F_C(x_i) / mean_i F_M(x_i); "
                            "faithfulness_ratio_per_prompt_mean = mean_i F_C(x_i)/F_M(x_i) (information only)",
        "circuit": circuit_summary(circuit),
        "naive_circuit": circuit_summary(naive),
        "n_layers": int(model.cfg.n_layers),
        "n_heads": int(model.cfg.n_heads),
    })
    if is_paper_circuit(circuit):
        summary["paper_reference"] = dict(PAPER_FAITHFULNESS)
    meta = {
        "definition": "LD at END; mean ablation of z with template-wise p_ABC means (computed once per "
                      "dataset); circuit heads kept at their relevant positions; MLPs never ablated",
        "naive_circuit": naive.name,
        "dataset_seeds": seeds,
        "ci": "95% percentile bootstrap over prompts, paired (F_M, F_C resampled jointly), "
              f"{N_BOOTSTRAP} resamples",
    }
    return ExperimentResult(pd.concat(rows, ignore_index=True), summary, meta)


# ------------------------------------------------------------------------------------------------
# Completeness
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Point:
    circuit: str
    kind: str  # empty | class | random | greedy | greedy_candidate
    label: str
    heads: tuple[Head, ...]
    x: np.ndarray
    y: np.ndarray
    run: int = -1
    iteration: int = -1

    @property
    def incompleteness(self) -> float:
        return float(abs(self.x.mean() - self.y.mean()))

    def row(self, seed: int, with_ci: bool) -> dict[str, Any]:
        ci = abs_mean_diff_ci(self.x, self.y, seed) if with_ci else [None, None]
        return {
            "circuit": self.circuit, "kind": self.kind, "label": self.label,
            "heads": heads_text(self.heads), "size": len(self.heads), "run": self.run,
            "iteration": self.iteration, "x": float(self.x.mean()), "y": float(self.y.mean()),
            "incompleteness": self.incompleteness,
            "incompleteness_ci_low": ci[0], "incompleteness_ci_high": ci[1],
        }


def _greedy(evaluator: KnockoutEvaluator, heads: list[Head], name: str, rng: np.random.Generator,
            candidates: int, iterations: int, run: int, rule: str = "paper_code") -> list[_Point]:
    """One run of the greedy completeness search from K = ∅. Each step draws ``candidates`` heads v
    of C\\K without replacement and evaluates |F(C\\(K∪{v})) - F(M\\(K∪{v}))| (kind
    "greedy_candidate").

    ``rule="paper_code"`` (the paper code's ``new_greedy_search``, default): ``old`` starts at
    |F(C) - F(M)|; the best candidate set is taken only if its incompleteness > ``old`` (then
    ``old`` = it), else K stays and the next step samples afresh; the run's FINAL set is the one
    point of kind "greedy" (a run that never improves ends at K = ∅; the paper code then re-reports
    the previous run's set, a bookkeeping slip not reproduced). ``rule="algorithm3"`` (the printed
    Algorithm 3): every step adds the best candidate; each step's chosen set is a "greedy" point.
    """
    if rule not in GREEDY_RULES:
        raise ValueError(f"Unknown greedy rule {rule!r}: use one of {list(GREEDY_RULES)}.")
    points: list[_Point] = []
    k: tuple[Head, ...] = ()
    old = float(abs(_np(evaluator.f_circuit).mean() - _np(evaluator.f_model).mean()))
    final = _Point(name, "greedy", f"run {run} final", (), _np(evaluator.f_circuit),
                   _np(evaluator.f_model), run, -1)
    for iteration in range(iterations):
        pool = [h for h in heads if h not in k]
        if not pool:
            break
        picks = rng.choice(len(pool), size=min(candidates, len(pool)), replace=False)
        evaluator.prefetch([k + (pool[int(p)],) for p in picks])  # every candidate in one batched pass
        best: _Point | None = None
        for pick in sorted(int(p) for p in picks):
            trial = k + (pool[pick],)
            point = _Point(name, "greedy_candidate", f"run {run} step {iteration}", trial,
                           _np(evaluator.without(trial)), _np(evaluator.model_without(trial)), run, iteration)
            points.append(point)
            if best is None or point.incompleteness > best.incompleteness:
                best = point
        if rule == "algorithm3":
            best.kind = "greedy"
            k = best.heads
        elif best.incompleteness > old:
            k, old = best.heads, best.incompleteness
            final = dataclasses.replace(best, kind="greedy", label=f"run {run} final")
    if rule == "paper_code":
        points.append(final)
    return points


def _circuit_points(evaluator: KnockoutEvaluator, circuit: Circuit, name: str, ctx: RunContext,
                    rng: np.random.Generator, rule: str = "paper_code") -> list[_Point]:
    heads = [tuple(map(int, h)) for h in circuit.heads()]
    points = [_Point(name, "empty", "none", (), _np(evaluator.f_circuit), _np(evaluator.f_model))]
    classes = knockout_classes(circuit)
    randoms: list[tuple[Head, ...]] = []
    for index in range(N_RANDOM_SETS):
        chosen: tuple[Head, ...] = ()
        while not chosen:  # uniform over the non-empty subsets of C
            chosen = tuple(h for h, keep in zip(heads, rng.random(len(heads)) < 0.5) if keep)
        randoms.append(chosen)
    evaluator.prefetch(list(classes.values()) + randoms)  # the class and random sets in one batched pass
    for cls, members in classes.items():
        points.append(_Point(name, "class", cls, members, _np(evaluator.without(members)),
                             _np(evaluator.model_without(members))))
    for index, chosen in enumerate(randoms):
        points.append(_Point(name, "random", f"random {index}", chosen, _np(evaluator.without(chosen)),
                             _np(evaluator.model_without(chosen))))
    iterations = min(GREEDY_ITERATIONS, len(heads))
    for run in _progress(ctx, range(greedy_runs(ctx)), desc=f"greedy completeness ({name}, {rule})"):
        points += _greedy(evaluator, heads, name, rng, GREEDY_CANDIDATES[name], iterations, run, rule)
    return points


def fig22_points(evaluator: KnockoutEvaluator, circuit: Circuit, name: str) -> list[_Point]:
    """The paper's four Fig. 22 greedy sets K, evaluated as given (paper circuit only; ``[]`` for a
    circuit that does not contain them): a deterministic check of §4.1's "incompleteness up to
    3.09" that does not depend on the search."""
    members = {tuple(map(int, h)) for h in circuit.heads()}
    if not is_paper_circuit(circuit) or not all(k <= members for k in PAPER_GREEDY_SETS):
        return []
    points = []
    evaluator.prefetch([tuple(sorted(k)) for k in PAPER_GREEDY_SETS])  # the four sets in one batched pass
    for index, k in enumerate(PAPER_GREEDY_SETS):
        heads = tuple(sorted(k))
        points.append(_Point(name, "fig22", f"Fig. 22 set {index + 1}", heads,
                             _np(evaluator.without(heads)), _np(evaluator.model_without(heads))))
    return points


GREEDY_RULE_NOTES = {
    "paper_code": "the paper code's rule (completeness.py new_greedy_search; produced Fig. 6): from "
                  "K = ∅ and old = |F(C) - F(M)|, each step draws `candidates` heads of C\\K and takes "
                  "the best K ∪ {v} only if its |x - y| > old (else K unchanged, the next step samples "
                  "afresh); kind 'greedy' = each run's final set (plotted), 'greedy_candidate' = every "
                  "evaluated set",
    "algorithm3": "the printed Algorithm 3 (App. M): from K = ∅, each step draws `candidates` heads "
                  "of C\\K and always adds the one maximising |x - y|; kind 'greedy' = every "
                  "intermediate chosen set (plotted)",
}


def _greedy_top(points: list[_Point], keep: int) -> list[dict[str, Any]]:
    unique: dict[frozenset, _Point] = {}
    for p in points:
        if p.kind == "greedy" and p.heads:  # a run that never improved ends at K = ∅
            unique.setdefault(frozenset(p.heads), p)
    best = sorted(unique.values(), key=lambda p: -p.incompleteness)[:keep]
    return [{"heads": heads_key(p.heads), "incompleteness": finite(p.incompleteness),
             "x": finite(p.x.mean()), "y": finite(p.y.mean())} for p in best]


def completeness(model, ctx: RunContext, greedy_rule: str | None = None) -> ExperimentResult:
    """Fig. 6: (F(C\\K), F(M\\K)) for K = ∅, each class, random subsets, a greedy search
    (``greedy_rule``: "paper_code", the default ``GREEDY_RULE``, or "algorithm3"; see the module
    docstring) and the paper's Fig. 22 sets, for the model's circuit ("full") and its naive
    circuit."""
    rule = GREEDY_RULE if greedy_rule is None else greedy_rule
    if rule not in GREEDY_RULES:
        raise ValueError(f"Unknown greedy rule {rule!r}: use one of {list(GREEDY_RULES)}.")
    circuit = ctx.circuit_for(model)
    naive = naive_circuit_for(circuit)
    naive.validate(model.cfg.n_layers, model.cfg.n_heads)
    means = compute_means(model, ctx)
    clean = CleanRun.build(model, ctx.ioi, memory_budget_mb=ctx.memory_budget_mb)
    all_points: list[_Point] = []
    summary: dict[str, Any] = {}
    n_forward = 0
    for index, (name, circ) in enumerate((("full", circuit), ("naive", naive))):
        evaluator = clean.evaluator(means, circ, ctx.ioi)
        rng = np.random.default_rng([int(ctx.seed), 7919, index])
        points = _circuit_points(evaluator, circ, name, ctx, rng, rule)
        fig22 = fig22_points(evaluator, circ, name)
        points += fig22
        n_forward += evaluator.n_forward
        all_points += points
        empty = points[0]
        classes = [p for p in points if p.kind == "class"]
        randoms = np.array([p.incompleteness for p in points if p.kind == "random"])
        greedy = [p for p in points if p.kind == "greedy"]  # every candidate is <= some such set
        summary.update({
            f"empty_{name}": {"x": finite(empty.x.mean()), "y": finite(empty.y.mean()),
                              "incompleteness": finite(empty.incompleteness)},
            f"class_incompleteness_{name}": {p.label: finite(p.incompleteness) for p in classes},
            f"class_incompleteness_ci_{name}": {p.label: abs_mean_diff_ci(p.x, p.y, ctx.seed) for p in classes},
            f"class_points_{name}": {p.label: [finite(p.x.mean()), finite(p.y.mean())] for p in classes},
            f"class_heads_{name}": {p.label: heads_key(p.heads) for p in classes},
            f"random_mean_incompleteness_{name}": finite(randoms.mean()),
            f"random_median_incompleteness_{name}": finite(np.median(randoms)),
            f"random_max_incompleteness_{name}": finite(randoms.max()),
            f"greedy_max_incompleteness_{name}": finite(max(p.incompleteness for p in greedy)),
            f"forward_passes_{name}": int(evaluator.n_forward),
        })
        summary.setdefault("greedy_sets", {})[name] = _greedy_top(points, GREEDY_KEEP)
        summary[f"greedy_final_incompleteness_{name}"] = [finite(p.incompleteness) for p in greedy] \
            if rule == "paper_code" else None
        if fig22:
            summary[f"fig22_sets_{name}"] = [
                {"heads": heads_key(p.heads), "x": finite(p.x.mean()), "y": finite(p.y.mean()),
                 "incompleteness": finite(p.incompleteness),
                 "incompleteness_ci": abs_mean_diff_ci(p.x, p.y, ctx.seed)} for p in fig22]
            summary[f"fig22_max_incompleteness_{name}"] = finite(max(p.incompleteness for p in fig22))
    f_m = float(clean.f_model.mean())
    summary.update({
        "F_M": finite(f_m),
        "greedy_max_incompleteness_full_fraction_of_F_M": finite(summary["greedy_max_incompleteness_full"] / f_m)
        if f_m else None,
        "greedy_rule": rule,
        "greedy_rule_note": GREEDY_RULE_NOTES[rule],
        "counts": {"random_sets": N_RANDOM_SETS, "greedy_runs": greedy_runs(ctx),
                   "greedy_iterations_max": GREEDY_ITERATIONS, "greedy_candidates": dict(GREEDY_CANDIDATES),
                   "greedy_keep": GREEDY_KEEP, "forward_passes": n_forward + 1},
        "paper_counts": {"random_sets": "10 (caption) / 100 (released data)", "greedy_runs": 10,
                         "greedy_iterations": 10, "greedy_candidates": {"full": 10, "naive": 5}},
        "name_mover_class_note": "K = 'name mover' merges the name movers and the backup name movers "
                                 "(paper code CIRCUIT['name mover'])",
        "circuit": circuit_summary(circuit),
        "naive_circuit": circuit_summary(naive),
        "n_layers": int(model.cfg.n_layers),
        "n_heads": int(model.cfg.n_heads),
    })
    if is_paper_circuit(circuit) and _is_gpt2_shaped(model):
        summary["paper_points"] = {k: {c: list(v) for c, v in pts.items()}
                                   for k, pts in PAPER_COMPLETENESS_POINTS.items()}
        summary["paper_points_source"] = PAPER_COMPLETENESS_SOURCE
        summary["paper_reference"] = dict(PAPER_COMPLETENESS_TEXT)
    frame = pd.DataFrame([p.row(ctx.seed, with_ci=p.kind in ("empty", "class", "greedy", "fig22"))
                          for p in all_points])
    meta = {
        "definition": "x = F(C\\K): K's heads ablated at every position like non-circuit heads; "
                      "y = F(M\\K): only K's heads ablated, at their relevant positions; "
                      "incompleteness = |x - y| of the means over prompts",
        "random_sets": "each head in K independently with probability 1/2 (uniform over subsets), "
                       "empty sets redrawn",
        "greedy": GREEDY_RULE_NOTES[rule],
        "fig22": "the paper's four Fig. 22 greedy sets evaluated as given (paper circuit only; kind "
                 "'fig22', keys fig22_sets_full / fig22_max_incompleteness_full)",
        "counts": summary["counts"],
    }
    return ExperimentResult(frame, summary, meta)


# ------------------------------------------------------------------------------------------------
# Minimality
# ------------------------------------------------------------------------------------------------


def _paper_row_order(circuit: Circuit) -> list[Head]:
    heads = [tuple(map(int, h)) for h in circuit.heads()]
    if not is_paper_circuit(circuit):
        return heads
    order = [tuple(int(x) for x in key.split(".")) for key in PAPER_FIG20]
    return [h for h in order if h in heads] + [h for h in heads if h not in order]


def minimality(model, ctx: RunContext) -> ExperimentResult:
    """Figs. 7, 20: |F(C\\(K∪{v})) - F(C\\K)| for every circuit head v with its K(v)."""
    circuit = ctx.circuit_for(model)
    means = compute_means(model, ctx)
    clean = CleanRun.build(model, ctx.ioi, memory_budget_mb=ctx.memory_budget_mb)
    evaluator = clean.evaluator(means, circuit, ctx.ioi)
    f_m = _np(clean.f_model)
    k_sets = minimality_k_sets(circuit)
    paper = is_paper_circuit(circuit) and _is_gpt2_shaped(model)
    rows, score, fraction, score_cis = [], {}, {}, {}
    sets = [tuple(sorted(k_sets.get(v, frozenset()))) for v in _paper_row_order(circuit)]
    evaluator.prefetch(sets, kinds=("C",))  # every K, then every K ∪ {v} (resuming from K), batched
    evaluator.prefetch([k + (v,) for k, v in zip(sets, _paper_row_order(circuit))], kinds=("C",))
    for v in _progress(ctx, _paper_row_order(circuit), desc="minimality"):
        k = tuple(sorted(k_sets.get(v, frozenset())))
        with_v = _np(evaluator.without(k + (v,)))
        without_k = _np(evaluator.without(k))
        value = abs(with_v.mean() - without_k.mean())
        ci = abs_mean_diff_ci(with_v, without_k, ctx.seed)
        key = head_key(*v)
        score[key] = finite(value)
        fraction[key] = finite(value / f_m.mean()) if f_m.mean() else None
        score_cis[key] = ci
        paper_row = PAPER_FIG20.get(key) if paper else None
        rows.append({
            "layer": v[0], "head": v[1], "class": circuit.class_of(v),
            "K": heads_text(k), "K_union_v": heads_text(k + (v,)), "K_size": len(k),
            "F_C_without_K_and_v": float(with_v.mean()), "F_C_without_K": float(without_k.mean()),
            "score": float(value), "score_ci_low": ci[0], "score_ci_high": ci[1],
            "score_fraction": float(value / f_m.mean()) if f_m.mean() else float("nan"),
            "paper_F_C_without_K_and_v": paper_row[0] if paper_row else float("nan"),
            "paper_F_C_without_K": paper_row[1] if paper_row else float("nan"),
            "paper_percent_of_F_M": paper_row[2] if paper_row else float("nan"),
            "paper_K_text": PAPER_FIG20_K_TEXT.get(key, "") if paper_row else "",
        })
    fractions = [v for v in fraction.values() if v is not None]
    summary = {
        "score": score,
        "score_fraction": fraction,
        "score_cis": score_cis,
        "min_score_fraction": finite(min(fractions)) if fractions else None,
        "min_score_head": min(fraction, key=lambda k: fraction[k] if fraction[k] is not None else math.inf)
        if fractions else None,
        "F_M": finite(f_m.mean()),
        "F_C": finite(_np(evaluator.f_circuit).mean()),
        "k_sets": {head_key(*v): heads_key(k_sets.get(v, ())) for v in _paper_row_order(circuit)},
        "row_order": [head_key(*v) for v in _paper_row_order(circuit)],
        "forward_passes": int(evaluator.n_forward + 1),
        "circuit": circuit_summary(circuit),
        "n_layers": int(model.cfg.n_layers),
        "n_heads": int(model.cfg.n_heads),
    }
    if paper:
        summary["paper_fig20"] = {k: list(v) for k, v in PAPER_FIG20.items()}
        summary["paper_fig20_source"] = PAPER_FIG20_SOURCE
    meta = {
        "definition": "score(v) = |F(C\\(K∪{v})) - F(C\\K)|, K(v) from ioi.circuits.minimality_k_sets "
                      "(the paper's Fig. 20 sets for the paper circuit); F(C\\K): K ablated at every "
                      "position; score_fraction = score / F(M)",
        "score_cis": "95% paired bootstrap over prompts of |mean difference| (key score_cis, per head)",
    }
    return ExperimentResult(pd.DataFrame(rows), summary, meta)
