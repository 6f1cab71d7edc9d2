"""Slow, obviously faithful edge patching: hooks on the TransformerLens bridge, one set at a time.

Per edge set, one forward pass of the bridge on the clean tokens with hooks that

* record every sender's output *in this run* as it is computed (``hook_embed + hook_pos_embed``;
  each head's ``hook_z[:, :, h] @ W_O[h]``; ``hook_mlp_out``) and the residual stream where the
  receivers read it (``hook_resid_pre``, ``hook_resid_mid``);
* rebuild each patched receiver's input as ``resid + sum_{edges} (target_s - current_s)`` (masked
  to the edge's token position) and replace what the receiver computes from it: a head's
  ``hook_q`` / ``hook_k`` / ``hook_v`` slice becomes ``ln1(x) @ W_Q[h] + b_Q[h]`` (resp. K, V) with
  the block's own ``ln1`` module; an MLP's ``mlp.hook_in`` becomes ``ln2(x)``; the logits'
  ``ln_final.hook_in`` becomes ``x``.

Targets come from a cached corrupted run (same sender hooks) or from given means. Nothing of
:mod:`ioi.edges._engine` is used.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ioi.edges.graph import EdgeGraph
from ioi.edges.patching import Mode, set_masks
from ioi.metrics import LogitDiff

__all__ = ["patch_edges_reference", "sender_outputs_reference"]


def _capture_hooks(model, graph: EdgeGraph, store: dict, guard: dict):
    """Hooks recording sender outputs and receiver-side residual streams into ``store``."""
    hooks = []

    def keep(name, fn=lambda x: x):
        def hook(x, hook):
            if not guard.get("inside"):
                store[name] = fn(x).detach().clone()
            return x
        return hook

    hooks.append(("hook_embed", keep("tok")))
    hooks.append(("hook_pos_embed", keep("pos")))
    for layer in range(model.cfg.n_layers):
        W_O = model.W_O[layer].detach()

        def heads(z, hook, layer=layer, W_O=W_O):
            if not guard.get("inside"):
                out = torch.einsum("bphe,hed->hbpd", z.detach(), W_O)
                for h in range(model.cfg.n_heads):
                    store[f"a{layer}.h{h}"] = out[h].clone()
            return z

        hooks.append((f"blocks.{layer}.hook_resid_pre", keep(f"resid_pre{layer}")))
        hooks.append((f"blocks.{layer}.attn.hook_z", heads))
        if not graph.attn_only:
            hooks.append((f"blocks.{layer}.hook_resid_mid", keep(f"resid_mid{layer}")))
            hooks.append((f"blocks.{layer}.hook_mlp_out", keep(f"m{layer}")))
    return hooks


def sender_outputs_reference(model, tokens: Tensor, graph: EdgeGraph) -> Tensor:
    """``[senders, n, pos, d]`` sender outputs from the bridge's hooks."""
    store: dict = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=_capture_hooks(model, graph, store, {}))
    store["embed"] = store["tok"] + store["pos"]
    return torch.stack([store[name].expand_as(store["tok"]) for name in graph.senders])


def _position_mask(graph: EdgeGraph, slot: int, word_idx, n: int, P: int, device) -> Tensor:
    """``[n, P, 1]`` float mask of the token positions of a slot, on ``device`` (the hooked
    activations' device, which it multiplies)."""
    label = graph.slots[slot]
    if label is None:
        return torch.ones(n, P, 1, device=device)
    mask = torch.zeros(n, P, 1, device=device)
    rows = torch.arange(n, device=device)
    if label == "other":
        mask[:] = 1
        for other in graph.positions:
            if other != "other":
                mask[rows, torch.as_tensor(word_idx[other]).long().to(device)] = 0
        return mask
    mask[rows, torch.as_tensor(word_idx[label]).long().to(device)] = 1
    return mask


@torch.no_grad()
def patch_edges_reference(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor | None,
    edge_sets,
    metric: LogitDiff | Callable[[Tensor], Tensor],
    *,
    graph: EdgeGraph,
    word_idx: dict | None = None,
    mean_activations: Tensor | None = None,
    mode: Mode = "patch",
) -> Tensor:
    """Same contract as :func:`ioi.edges.patch_edges`, one hooked bridge forward per set."""
    n, P = clean_tokens.shape
    if corrupted_tokens is not None:
        target = sender_outputs_reference(model, corrupted_tokens, graph)
    else:
        target = mean_activations[:, :, :P].expand(-1, n, -1, -1)
    mask = set_masks(graph, edge_sets, mode)
    pos_masks = [_position_mask(graph, j, word_idx, n, P, target.device) for j in range(graph.n_slots)]
    H = model.cfg.n_heads
    out = []
    for k in range(mask.shape[0]):
        incoming: dict[str, list[tuple[int, int]]] = {}
        for i in mask[k].nonzero()[:, 0].tolist():
            edge = graph.edges[i]
            incoming.setdefault(edge.receiver, []).append((graph.sender_of(edge.sender), int(graph.slot_index[i])))
        store: dict = {}
        guard: dict = {}
        hooks = _capture_hooks(model, graph, store, guard)

        def current(name: str) -> Tensor:
            return store["tok"] + store["pos"] if name == "embed" else store[name]

        def receiver_input(receiver: str, resid: Tensor) -> Tensor:
            x = resid.clone()
            for s, slot in incoming.get(receiver, []):
                name = graph.senders[s]
                x = x + (target[s] - current(name)) * pos_masks[slot]
            return x

        for layer in range(model.cfg.n_layers):
            for part, W_name, b_name in (("q", "W_Q", "b_Q"), ("k", "W_K", "b_K"), ("v", "W_V", "b_V")):
                names = [f"a{layer}.h{h}.{part}" for h in range(H) if f"a{layer}.h{h}.{part}" in incoming]
                if not names:
                    continue

                def qkv_hook(act, hook, layer=layer, part=part, W_name=W_name, b_name=b_name):
                    act = act.clone()
                    W, b = getattr(model, W_name)[layer], getattr(model, b_name)[layer]
                    for h in range(H):
                        receiver = f"a{layer}.h{h}.{part}"
                        if receiver not in incoming:
                            continue
                        x = receiver_input(receiver, store[f"resid_pre{layer}"])
                        guard["inside"] = True
                        normed = model.blocks[layer].ln1(x)
                        guard["inside"] = False
                        act[:, :, h] = normed @ W[h] + b[h]
                    return act

                hooks.append((f"blocks.{layer}.attn.hook_{part}", qkv_hook))
            if f"m{layer}" in incoming:

                def mlp_hook(act, hook, layer=layer):
                    x = receiver_input(f"m{layer}", store[f"resid_mid{layer}"])
                    guard["inside"] = True
                    normed = model.blocks[layer].ln2(x)
                    guard["inside"] = False
                    return normed

                hooks.append((f"blocks.{layer}.mlp.hook_in", mlp_hook))
        if "logits" in incoming:
            hooks.append(("ln_final.hook_in", lambda act, hook: receiver_input("logits", act)))
        logits = model.run_with_hooks(clean_tokens, fwd_hooks=hooks)
        out.append(torch.as_tensor(metric(logits)).float())
    return torch.stack(out)
