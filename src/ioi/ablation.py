"""Knockouts: template-wise mean ablation of attention heads and MLPs (paper §2.1, §4, App. F, J).

* Means (:func:`compute_template_means`): the mean of each head's output ``hook_z`` (or of each
  MLP's ``hook_mlp_out``) over reference prompts (p_ABC) **of the same template group**, per token
  position, computed once and reused. Prompts of a group share their template, so position ``p``
  is the same template slot for all of them; groups may have different lengths (the batch is
  right-padded). The paper code ablates ``hook_result`` (= ``z @ W_O`` per head); replacing ``z``
  by its mean is the same thing because ``W_O`` is linear.
* Circuits: ``{(layer, head): positions to KEEP}`` with per-prompt positions (``LongTensor[N]``,
  a list of them, or ``None`` for every position). :func:`ablate_circuit` builds the paper's
  knockouts: F(C) (every head at every position mean-ablated except circuit heads at their
  relevant positions), F(C\\K) (K's heads ablated at all positions, like non-circuit heads), F(M\\K)
  (only K's heads ablated, at their relevant positions; everything else intact), F(M) (nothing).
  MLPs, LayerNorms and embeddings are never ablated in these.
* Masks are built per prompt, ``keep[arange(N), positions, layer, head] = True`` -- never the
  ARENA bug ``keep[:, positions, ...]`` (which keeps the union of every prompt's positions) -- and
  applied with ``torch.where(keep, z, means)`` in one hook per layer.
* :func:`knockout_heads` (e.g. the name movers at END, to find backup name movers),
  :func:`mlp_knockout` / :func:`knockout_mlps` / :func:`mlp_knockout_sweep` (Fig. 19). An
  :class:`Ablation` can also be passed as ``knockout=`` to :mod:`ioi.patching.path` (Fig. 15).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Literal, Mapping, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ioi.ablation_engine import KnockoutEngine, KnockoutSpec
from ioi.forward import cache_activations
from ioi.patching._fast_forward import UnsupportedModelError, net_weights
from ioi.patching.path import DEFAULT_MEMORY_BUDGET_MB, Positions, positions_as_list
from ioi.validation import check_tokens

__all__ = [
    "Ablation",
    "Circuit",
    "KnockoutMode",
    "ablate_circuit",
    "circuit_keep_mask",
    "circuit_positions",
    "completeness_pair",
    "compute_template_means",
    "evaluate_ablations",
    "evaluate_circuit",
    "evaluate_circuits",
    "expand_group_means",
    "head_knockout",
    "knockout_heads",
    "knockout_mlps",
    "mlp_knockout",
    "mlp_knockout_sweep",
    "run_with_ablation",
]

Head = tuple[int, int]
Circuit = Mapping[Head, Positions]
KnockoutMode = Literal["all_positions", "relevant_positions"]
Knockout = Union[None, Iterable[Head], Mapping[Head, Positions]]


# ----------------------------------------------------------------------------------------------
# Means
# ----------------------------------------------------------------------------------------------


def _check_groups(groups: Sequence[Tensor], n_prompts: int, device) -> list[Tensor]:
    groups = [torch.as_tensor(g, device=device).long().reshape(-1) for g in groups]
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("groups must be a non-empty list of non-empty index tensors.")
    seen = torch.cat(groups)
    if int(seen.min()) < 0 or int(seen.max()) >= n_prompts:
        raise ValueError(f"group indices must lie in [0, {n_prompts}).")
    return groups


def _is_partition(groups: list[Tensor], n_prompts: int) -> bool:
    seen = torch.cat(groups)
    return len(seen) == n_prompts and bool((seen.sort().values == torch.arange(n_prompts, device=seen.device)).all())


@torch.no_grad()
def compute_template_means(
    model,
    ref_toks: Int[Tensor, "batch seq"],
    groups: Sequence[Tensor] | None = None,
    *,
    component: Literal["z", "mlp_out"] = "z",
    per_prompt: bool = True,
    batch_size: int | None = None,
) -> Tensor:
    """Template-wise means of every head's ``z`` (or every MLP's output) over reference prompts.

    Args:
        ref_toks: the reference batch (p_ABC), position-aligned with the prompts to be ablated.
        groups: index tensors, one per template group (e.g. ``IOIDataset.groups``); ``None`` = a
            single group (the plain mean over all prompts).
        component: ``"z"`` -> ``[.., seq, n_layers, n_heads, d_head]``; ``"mlp_out"`` ->
            ``[.., seq, n_layers, d_model]``.
        per_prompt: ``True`` -> first axis ``N`` (prompt ``n`` gets its group's mean; ``groups``
            must then partition the prompts); ``False`` -> first axis ``n_groups``.
        batch_size: run the reference batch in slices of this many prompts (memory).
    """
    ref_toks = check_tokens(model, ref_toks, "ref_toks")
    N, S = ref_toks.shape
    L = model.cfg.n_layers
    if component == "z":
        names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    elif component == "mlp_out":
        names = [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    else:
        raise ValueError(f"component must be 'z' or 'mlp_out'; got {component!r}.")
    parts = []
    step = N if batch_size is None else max(1, int(batch_size))
    try:  # the plain-tensor forward (exact; the hooked bridge pass for models it does not cover)
        net = net_weights(model, model.W_U.device)
    except UnsupportedModelError:
        net = None
    for start in range(0, N, step):
        chunk = ref_toks[start : start + step]
        if net is not None:
            parts.append(_activations(net, chunk, component))
            continue
        cache = cache_activations(model, chunk, names)
        parts.append(torch.stack([cache[n] for n in names], dim=2))
    acts = torch.cat(parts, dim=0)  # [N, S, L, ...]
    if groups is None:
        groups = [torch.arange(N, device=acts.device)]
    groups = _check_groups(groups, N, acts.device)
    group_means = torch.stack([acts[g].mean(dim=0) for g in groups])
    if not per_prompt:
        return group_means
    return expand_group_means(group_means, groups, N)


def _activations(net, toks: Tensor, component: str) -> Tensor:
    """``[batch, seq, n_layers, ...]``: every head's ``z`` or every MLP's output, one forward."""
    n, n_pos = toks.shape
    resid = net.W_E[toks] + net.W_pos[:n_pos]
    out = []
    for layer in range(net.n_layers):
        qkv = net.linear(net.ln(resid, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])
        z, _ = net.attention(layer, *net.split_qkv(qkv))
        if component == "z":
            out.append(z)
        resid = resid + net.attn_out_from_z(layer, z.reshape(n, n_pos, net.hd))
        if not net.attn_only:
            mlp_out = net.mlp(layer, resid)
            if component == "mlp_out":
                out.append(mlp_out)
            resid = resid + mlp_out
        elif component == "mlp_out":
            raise ValueError("An attention-only model has no MLP outputs.")
    return torch.stack(out, dim=2)


def expand_group_means(group_means: Tensor, groups: Sequence[Tensor], n_prompts: int) -> Tensor:
    """Per-prompt means ``[N, ...]`` from per-group means ``[n_groups, ...]``."""
    groups = _check_groups(groups, n_prompts, group_means.device)
    if len(groups) != group_means.shape[0]:
        raise ValueError(f"{len(groups)} groups for {group_means.shape[0]} group means.")
    if not _is_partition(groups, n_prompts):
        raise ValueError("groups must partition the prompts (every prompt in exactly one group).")
    out = group_means.new_empty((n_prompts, *group_means.shape[1:]))
    for g, idx in enumerate(groups):
        out[idx] = group_means[g]
    return out


# ----------------------------------------------------------------------------------------------
# The ablation object
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Ablation:
    """Which head outputs / MLP outputs to keep, and the means that replace the others.

    ``head_keep [N, seq, n_layers, n_heads]`` (``False`` = replace ``z`` by ``head_means
    [N, seq, n_layers, n_heads, d_head]``); ``mlp_keep [N, seq, n_layers]`` likewise with
    ``mlp_means [N, seq, n_layers, d_model]``. Either part may be ``None``.
    """

    head_keep: Bool[Tensor, "batch seq layer head"] | None = None
    head_means: Float[Tensor, "batch seq layer head d_head"] | None = None
    mlp_keep: Bool[Tensor, "batch seq layer"] | None = None
    mlp_means: Float[Tensor, "batch seq layer d_model"] | None = None

    def __post_init__(self) -> None:
        if (self.head_keep is None) != (self.head_means is None):
            raise ValueError("head_keep and head_means must be given together.")
        if (self.mlp_keep is None) != (self.mlp_means is None):
            raise ValueError("mlp_keep and mlp_means must be given together.")
        if self.head_keep is not None and tuple(self.head_means.shape[:4]) != tuple(self.head_keep.shape):
            raise ValueError(
                f"head_means {tuple(self.head_means.shape)} does not match head_keep "
                f"{tuple(self.head_keep.shape)}."
            )
        if self.mlp_keep is not None and tuple(self.mlp_means.shape[:3]) != tuple(self.mlp_keep.shape):
            raise ValueError(
                f"mlp_means {tuple(self.mlp_means.shape)} does not match mlp_keep "
                f"{tuple(self.mlp_keep.shape)}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        keep = self.head_keep if self.head_keep is not None else self.mlp_keep
        return (0, 0) if keep is None else (keep.shape[0], keep.shape[1])

    def check_shape(self, n_prompts: int, seq: int) -> None:
        if self.head_keep is None and self.mlp_keep is None:
            return
        if self.shape != (n_prompts, seq):
            raise ValueError(
                f"The ablation is for a [{self.shape[0]}, {self.shape[1]}] batch; the tokens are "
                f"[{n_prompts}, {seq}]. Build it from means over a position-aligned reference batch."
            )

    def n_ablated(self) -> int:
        n = 0 if self.head_keep is None else int((~self.head_keep).sum())
        return n + (0 if self.mlp_keep is None else int((~self.mlp_keep).sum()))

    def hooks(self) -> list[tuple[str, Callable]]:
        """Forward hooks (``[(hook name, fn)]``) for ``model.hooks`` / ``run_with_hooks``."""
        hooks = []
        if self.head_keep is not None:
            for layer in range(self.head_keep.shape[2]):
                keep = self.head_keep[:, :, layer]
                if bool(keep.all()):
                    continue
                hooks.append((f"blocks.{layer}.attn.hook_z", _where_hook(keep[..., None], self.head_means[:, :, layer])))
        if self.mlp_keep is not None:
            for layer in range(self.mlp_keep.shape[2]):
                keep = self.mlp_keep[:, :, layer]
                if bool(keep.all()):
                    continue
                hooks.append((f"blocks.{layer}.hook_mlp_out", _where_hook(keep[..., None], self.mlp_means[:, :, layer])))
        return hooks

    def combine(self, other: "Ablation") -> "Ablation":
        """Both ablations at once (a component is kept only if both keep it)."""
        def merge(k1, m1, k2, m2):
            if k1 is None:
                return k2, m2
            if k2 is None:
                return k1, m1
            return k1 & k2, torch.where(k1[..., None], m2, m1)

        hk, hm = merge(self.head_keep, self.head_means, other.head_keep, other.head_means)
        mk, mm = merge(self.mlp_keep, self.mlp_means, other.mlp_keep, other.mlp_means)
        return Ablation(head_keep=hk, head_means=hm, mlp_keep=mk, mlp_means=mm)


def _where_hook(keep: Tensor, means: Tensor) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        if act.shape[:2] != keep.shape[:2]:
            raise ValueError(
                f"{hook.name}: activation batch {tuple(act.shape[:2])} does not match the "
                f"ablation's {tuple(keep.shape[:2])}."
            )
        return torch.where(keep, act, means.to(act.dtype))

    return hook


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def _head_positions(positions: Positions, n_prompts: int, device) -> list[Tensor] | None:
    return positions_as_list(positions, n_prompts, device)


def _set_head(mask: Tensor, layer: int, head: int, positions: Positions, value: bool) -> None:
    """``mask[arange(N), pos, layer, head] = value`` for each per-prompt position tensor."""
    N, S = mask.shape[:2]
    plist = _head_positions(positions, N, mask.device)
    if plist is None:
        mask[:, :, layer, head] = value
        return
    rows = torch.arange(N, device=mask.device)
    for pos in plist:
        if int(pos.min()) < 0 or int(pos.max()) >= S:
            raise ValueError(f"positions of head {layer}.{head} must lie in [0, {S}).")
        mask[rows, pos, layer, head] = value


def _check_head(head, n_layers: int, n_heads: int) -> Head:
    layer, index = int(head[0]), int(head[1])
    if not (0 <= layer < n_layers and 0 <= index < n_heads):
        raise ValueError(f"Head {layer}.{index} does not exist ({n_layers} layers x {n_heads} heads).")
    return layer, index


def circuit_keep_mask(
    circuit: Circuit, n_prompts: int, seq: int, n_layers: int, n_heads: int, device=None
) -> Bool[Tensor, "batch seq layer head"]:
    """``True`` where a circuit head is kept: each head at its own per-prompt positions."""
    keep = torch.zeros(n_prompts, seq, n_layers, n_heads, dtype=torch.bool, device=device)
    for head, positions in circuit.items():
        layer, index = _check_head(head, n_layers, n_heads)
        _set_head(keep, layer, index, positions, True)
    return keep


def _means_for(means: Tensor, n_prompts: int, seq: int, what: str) -> Tensor:
    if means.shape[0] != n_prompts:
        raise ValueError(
            f"{what} means have {means.shape[0]} rows for {n_prompts} prompts: pass per-prompt means "
            "(compute_template_means(..., per_prompt=True) or expand_group_means)."
        )
    if means.shape[1] < seq:
        raise ValueError(f"{what} means cover {means.shape[1]} positions; the tokens have {seq}.")
    return means[:, :seq]


def _normalise_knockout(knockout: Knockout, circuit: Circuit | None, mode: str) -> dict[Head, Positions]:
    if knockout is None:
        return {}
    if isinstance(knockout, Mapping):
        return {tuple(map(int, h)): p for h, p in knockout.items()}
    heads = [tuple(map(int, h)) for h in knockout]
    if mode == "all_positions":
        return {h: None for h in heads}
    if circuit is None:
        raise ValueError(
            "knockout_mode='relevant_positions' needs each knocked-out head's positions: pass the "
            "circuit (its positions are used) or a dict {head: positions}."
        )
    circuit_heads = {tuple(map(int, h)): p for h, p in circuit.items()}
    missing = [h for h in heads if h not in circuit_heads]
    if missing:
        raise ValueError(
            f"Heads {missing} are not in the circuit, so they have no relevant position; pass "
            "knockout as a dict {head: positions}."
        )
    return {h: circuit_heads[h] for h in heads}


def ablate_circuit(
    means: Float[Tensor, "batch seq layer head d_head"],
    circuit: Circuit | None,
    *,
    knockout: Knockout = None,
    knockout_mode: KnockoutMode = "all_positions",
    seq: int | None = None,
) -> Ablation:
    """The head ablation for F(C), F(C\\K), F(M\\K) or F(M).

    * ``circuit`` given, no knockout: F(C) -- every head at every position is mean-ablated except
      the circuit heads at their positions.
    * ``knockout=K, knockout_mode="all_positions"``: F(C\\K) -- K's heads leave the circuit and are
      ablated at every position like non-circuit heads (``circuit=None``: F(M\\K) with K ablated at
      every position).
    * ``knockout=K, knockout_mode="relevant_positions"``: F(M\\K) -- only K's heads are ablated, only
      at their relevant positions (from ``circuit``, or K given as ``{head: positions}``);
      everything else is intact (the circuit's other heads are not ablated).
    * ``circuit=None``, no knockout: F(M) (nothing ablated).

    ``knockout=None`` means "no K" (F(C) / F(M)); an empty K with ``"relevant_positions"`` is
    F(M minus nothing) = F(M), and with ``"all_positions"`` F(C).
    """
    if knockout_mode not in ("all_positions", "relevant_positions"):
        raise ValueError(f"knockout_mode must be 'all_positions' or 'relevant_positions'; got {knockout_mode!r}.")
    N, S_means, L, H = means.shape[:4]
    S = S_means if seq is None else seq
    means = _means_for(means, N, S, "head")
    ko = _normalise_knockout(knockout, circuit, knockout_mode)
    for head in ko:
        _check_head(head, L, H)
    if knockout_mode == "relevant_positions" and knockout is not None:  # F(M\K), even for K = {}
        keep = torch.ones(N, S, L, H, dtype=torch.bool, device=means.device)
        for (layer, index), positions in ko.items():
            _set_head(keep, layer, index, positions, False)
        return Ablation(head_keep=keep, head_means=means)
    if circuit is None:
        keep = torch.ones(N, S, L, H, dtype=torch.bool, device=means.device)
    else:
        keep = circuit_keep_mask(circuit, N, S, L, H, means.device)
    for (layer, index), positions in ko.items():
        _set_head(keep, layer, index, positions, False)
    return Ablation(head_keep=keep, head_means=means)


def head_knockout(
    means: Float[Tensor, "batch seq layer head d_head"],
    heads_with_positions: Mapping[Head, Positions] | Iterable[Head],
    *,
    seq: int | None = None,
) -> Ablation:
    """Mean-ablate only the given heads at the given per-prompt positions (``None`` = all)."""
    N, S_means, L, H = means.shape[:4]
    S = S_means if seq is None else seq
    means = _means_for(means, N, S, "head")
    if not isinstance(heads_with_positions, Mapping):
        heads_with_positions = {tuple(h): None for h in heads_with_positions}
    keep = torch.ones(N, S, L, H, dtype=torch.bool, device=means.device)
    for head, positions in heads_with_positions.items():
        layer, index = _check_head(head, L, H)
        _set_head(keep, layer, index, positions, False)
    return Ablation(head_keep=keep, head_means=means)


def mlp_knockout(
    mlp_means: Float[Tensor, "batch seq layer d_model"],
    layers: Iterable[int],
    positions: Positions = None,
    *,
    seq: int | None = None,
) -> Ablation:
    """Mean-ablate the outputs of MLP ``layers`` at ``positions`` (``None`` = every position)."""
    N, S_means, L = mlp_means.shape[:3]
    S = S_means if seq is None else seq
    mlp_means = _means_for(mlp_means, N, S, "MLP")
    keep = torch.ones(N, S, L, dtype=torch.bool, device=mlp_means.device)
    plist = positions_as_list(positions, N, mlp_means.device)
    rows = torch.arange(N, device=mlp_means.device)
    for layer in layers:
        layer = int(layer)
        if not 0 <= layer < L:
            raise ValueError(f"MLP layer {layer} does not exist ({L} layers).")
        if plist is None:
            keep[:, :, layer] = False
        else:
            for pos in plist:
                keep[rows, pos, layer] = False
    return Ablation(mlp_keep=keep, mlp_means=mlp_means)


# ----------------------------------------------------------------------------------------------
# Running (on the plain-tensor engine, ioi.ablation_engine; hooked twin: ioi.ablation_reference)
# ----------------------------------------------------------------------------------------------


def _spec_of(ablation: Ablation | None, n_prompts: int, seq: int, n_layers: int, n_heads: int, device,
             capture: bool = False) -> KnockoutSpec:
    """An :class:`Ablation` as an engine spec, with the cheaper source stream."""
    if ablation is None or ablation.head_keep is None:
        head_keep = torch.ones(n_prompts, seq, n_layers, n_heads, dtype=torch.bool, device=device)
    else:
        head_keep = ablation.head_keep[:, :seq].to(device)
    mlp_keep = None if ablation is None or ablation.mlp_keep is None else ablation.mlp_keep[:, :seq].to(device)
    kept = int(head_keep.sum())
    source = "ablated" if kept < head_keep.numel() - kept else "clean"
    return KnockoutSpec(head_keep=head_keep, source=source, mlp_keep=mlp_keep, capture=capture)


def _means_of(ablations: Sequence[Ablation | None], attr: str) -> Tensor | None:
    found = [getattr(a, attr) for a in ablations if a is not None and getattr(a, attr) is not None]
    if not found:
        return None
    first = found[0]
    if any(m is not first and (m.shape != first.shape or not torch.equal(m, first)) for m in found[1:]):
        raise ValueError(f"Batched ablations must share their {attr}; evaluate them in separate calls.")
    return first


@torch.no_grad()
def evaluate_ablations(
    model,
    toks: Int[Tensor, "batch seq"],
    metric: Callable[[Tensor], Tensor],
    ablations: Sequence[Ablation | None],
    *,
    memory_budget_mb: int | None = None,
) -> list[Tensor]:
    """``metric`` of the model under each ablation, many ablations per batched pass.

    Runs on the plain-tensor engine (:class:`ioi.ablation_engine.KnockoutEngine`): with an
    :class:`ioi.metrics.LogitDiff` only the two answer logits at END are computed; any other metric
    gets the full logits. Models the engine does not reproduce exactly fall back to the hooked
    reference (:mod:`ioi.ablation_reference`). The ablations must share their means tensors.
    """
    from ioi.ablation_reference import run_with_ablation as hooked_run
    from ioi.metrics import LogitDiff
    from ioi.patching._fast_forward import UnsupportedModelError

    device = model.W_U.device
    toks = check_tokens(model, toks, "toks").to(device)
    N, S = toks.shape
    for ablation in ablations:
        if ablation is not None:
            ablation.check_shape(N, S)
    try:
        net = net_weights(model, device)
    except UnsupportedModelError:
        return [metric(hooked_run(model, toks, a)) for a in ablations]
    budget = memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB.get(device.type, 1024)
    ld_mode = isinstance(metric, LogitDiff)
    kwargs = {}
    if ld_mode:
        kwargs = {"end": metric.end_idx, "io_ids": metric.io_ids, "s_ids": metric.s_ids}
    engine = KnockoutEngine(net, toks, head_means=_means_of(ablations, "head_means"),
                            mlp_means=_means_of(ablations, "mlp_means"), memory_budget_mb=budget, **kwargs)
    specs = [_spec_of(a, N, engine.seq, net.n_layers, net.n_heads, device) for a in ablations]
    runs = engine.evaluate(specs)
    if ld_mode:
        return [metric.reduce(run.ld.to(net.W_E.dtype)) for run in runs]
    return [metric(run.logits) for run in runs]


def _evaluate_one(model, toks: Int[Tensor, "batch seq"], metric: Callable[[Tensor], Tensor],
                  ablation: Ablation | None) -> Tensor:
    """``metric`` of the model under one ablation (:func:`evaluate_ablations` of a single one)."""
    return evaluate_ablations(model, toks, metric, [ablation])[0]


@torch.no_grad()
def run_with_ablation(model, toks: Int[Tensor, "batch seq"], ablation: Ablation | None) -> Tensor:
    """Logits of ``toks`` with ``ablation`` applied (the plain-tensor engine; full logits)."""
    return _evaluate_one(model, toks, lambda logits: logits, ablation)


def evaluate_circuit(
    model,
    toks: Int[Tensor, "batch seq"],
    metric: Callable[[Tensor], Tensor],
    means: Float[Tensor, "batch seq layer head d_head"],
    circuit: Circuit | None,
    *,
    knockout: Knockout = None,
    knockout_mode: KnockoutMode = "all_positions",
) -> Tensor:
    """F(C), F(C\\K), F(M\\K) or F(M) (see :func:`ablate_circuit`) under ``metric``."""
    ablation = ablate_circuit(means, circuit, knockout=knockout, knockout_mode=knockout_mode, seq=toks.shape[1])
    return _evaluate_one(model, toks, metric, ablation)


def evaluate_circuits(
    model,
    toks: Int[Tensor, "batch seq"],
    metric: Callable[[Tensor], Tensor],
    means: Float[Tensor, "batch seq layer head d_head"],
    circuit: Circuit | None,
    knockouts: Sequence[Knockout],
    *,
    knockout_mode: KnockoutMode = "all_positions",
    memory_budget_mb: int | None = None,
) -> list[Tensor]:
    """:func:`evaluate_circuit` for many K at once (one batched pass per memory chunk)."""
    ablations = [ablate_circuit(means, circuit, knockout=k, knockout_mode=knockout_mode, seq=toks.shape[1])
                 for k in knockouts]
    return evaluate_ablations(model, toks, metric, ablations, memory_budget_mb=memory_budget_mb)


def completeness_pair(
    model,
    toks: Int[Tensor, "batch seq"],
    metric: Callable[[Tensor], Tensor],
    means: Float[Tensor, "batch seq layer head d_head"],
    circuit: Circuit,
    knockout: Iterable[Head],
) -> tuple[Tensor, Tensor]:
    """``(F(C\\K), F(M\\K))`` for one set K (the paper code's completeness asymmetry)."""
    knockout = [tuple(h) for h in knockout]
    f_c = evaluate_circuit(model, toks, metric, means, circuit, knockout=knockout, knockout_mode="all_positions")
    f_m = evaluate_circuit(model, toks, metric, means, circuit, knockout=knockout, knockout_mode="relevant_positions")
    return f_c, f_m


def knockout_heads(
    model,
    toks: Int[Tensor, "batch seq"],
    metric: Callable[[Tensor], Tensor],
    means: Float[Tensor, "batch seq layer head d_head"],
    heads_with_positions: Mapping[Head, Positions] | Iterable[Head],
) -> Tensor:
    """Metric with only the given heads mean-ablated at the given positions (``None`` = all)."""
    ablation = head_knockout(means, heads_with_positions, seq=toks.shape[1])
    return _evaluate_one(model, toks, metric, ablation)


def knockout_mlps(
    model,
    toks: Int[Tensor, "batch seq"],
    metric: Callable[[Tensor], Tensor],
    mlp_means: Float[Tensor, "batch seq layer d_model"],
    layers: Iterable[int],
    positions: Positions = None,
) -> Tensor:
    """Metric with MLP ``layers`` mean-ablated (e.g. ``range(1, n_layers)``: all but MLP0)."""
    ablation = mlp_knockout(mlp_means, layers, positions, seq=toks.shape[1])
    return _evaluate_one(model, toks, metric, ablation)


def mlp_knockout_sweep(
    model,
    toks: Int[Tensor, "batch seq"],
    metric: Callable[[Tensor], Tensor],
    mlp_means: Float[Tensor, "batch seq layer d_model"],
    *,
    progress: bool = True,
) -> Tensor:
    """``Tensor[n_layers]``: the metric with each MLP layer mean-ablated alone (paper Fig. 19 left),
    every layer in one batched pass (``progress`` is accepted for compatibility)."""
    L = mlp_means.shape[2]
    ablations = [mlp_knockout(mlp_means, [layer], seq=toks.shape[1]) for layer in range(L)]
    values = evaluate_ablations(model, toks, metric, ablations)
    return torch.stack([torch.as_tensor(v).float() for v in values])


def circuit_positions(circuit, word_idx: Mapping[str, Tensor]) -> dict[Head, Tensor]:
    """``{head: word_idx[key]}`` for an :class:`ioi.circuits.Circuit` (its relevant position keys)."""
    out = {}
    for head, key in circuit.heads_with_positions().items():
        if key not in word_idx:
            raise KeyError(f"word_idx has no {key!r} (needed for head {head}); has {sorted(word_idx)}.")
        out[tuple(head)] = word_idx[key]
    return out
