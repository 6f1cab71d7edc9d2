"""The slow, obviously faithful twin of the knockouts in :mod:`ioi.ablation`: hooks on the bridge.

Each function runs one full bridge forward pass per knockout, with one ``torch.where(keep, z,
means)`` hook per layer on ``blocks.{l}.attn.hook_z`` (and ``blocks.{l}.hook_mlp_out`` for MLP
knockouts), from :meth:`ioi.ablation.Ablation.hooks`, then applies the metric to the full logits.
This is how the paper code's ``EasyAblation`` (mean by template groups) ablates ``hook_result``
(= ``z @ W_O`` per head, the same replacement because ``W_O`` is linear). The fast functions of
:mod:`ioi.ablation` (on :mod:`ioi.ablation_engine`) are tested equal to these to 1e-4.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ioi.ablation import (
    Ablation,
    Circuit,
    Head,
    Knockout,
    KnockoutMode,
    ablate_circuit,
    head_knockout,
    mlp_knockout,
)
from ioi.patching.path import Positions

__all__ = [
    "completeness_pair",
    "evaluate_circuit",
    "knockout_heads",
    "knockout_mlps",
    "mlp_knockout_sweep",
    "run_with_ablation",
]


@torch.no_grad()
def run_with_ablation(model, toks: Int[Tensor, "batch seq"], ablation: Ablation | None) -> Tensor:
    """Logits of ``toks`` with ``ablation`` applied (one bridge forward pass, one hook per layer)."""
    toks = torch.as_tensor(toks).to(model.W_U.device)
    if ablation is None:
        return model(toks)
    ablation.check_shape(*toks.shape)
    return model.run_with_hooks(toks, fwd_hooks=ablation.hooks())


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
    """F(C), F(C\\K), F(M\\K) or F(M) (see :func:`ioi.ablation.ablate_circuit`) under ``metric``."""
    ablation = ablate_circuit(means, circuit, knockout=knockout, knockout_mode=knockout_mode, seq=toks.shape[1])
    return metric(run_with_ablation(model, toks, ablation))


def completeness_pair(model, toks, metric, means, circuit: Circuit, knockout: Iterable[Head]) -> tuple[Tensor, Tensor]:
    """``(F(C\\K), F(M\\K))`` for one set K."""
    knockout = [tuple(h) for h in knockout]
    f_c = evaluate_circuit(model, toks, metric, means, circuit, knockout=knockout, knockout_mode="all_positions")
    f_m = evaluate_circuit(model, toks, metric, means, circuit, knockout=knockout, knockout_mode="relevant_positions")
    return f_c, f_m


def knockout_heads(model, toks, metric, means, heads_with_positions: Mapping[Head, Positions] | Iterable[Head]) -> Tensor:
    """Metric with only the given heads mean-ablated at the given positions (``None`` = all)."""
    return metric(run_with_ablation(model, toks, head_knockout(means, heads_with_positions, seq=toks.shape[1])))


def knockout_mlps(model, toks, metric, mlp_means, layers: Iterable[int], positions: Positions = None) -> Tensor:
    """Metric with MLP ``layers`` mean-ablated."""
    return metric(run_with_ablation(model, toks, mlp_knockout(mlp_means, layers, positions, seq=toks.shape[1])))


def mlp_knockout_sweep(model, toks, metric, mlp_means, *, progress: bool = False) -> Tensor:
    """``Tensor[n_layers]``: the metric with each MLP layer mean-ablated alone, one pass each."""
    L = mlp_means.shape[2]
    return torch.stack([
        torch.as_tensor(knockout_mlps(model, toks, metric, mlp_means, [layer])).float()
        for layer in tqdm(range(L), desc="MLP knockouts (reference)", disable=not progress)
    ])
