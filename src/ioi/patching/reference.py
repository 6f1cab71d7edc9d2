"""Slow reference path patching: the seed notebook's hook loops, line by line, on the bridge.

``ref_path_patch_to_logits`` follows ``get_path_patch_head_to_final_resid_post`` and
``ref_path_patch_to_heads`` follows ``get_path_patch_head_to_heads`` (with ``patch_or_freeze_head_
vectors`` and ``patch_head_input``), one sender at a time, two forward passes per sender for head
receivers. Extensions, each as the paper code (Easy-Transformer ``path_patching``) does it:

* ``sender_positions``: the sender is patched only at those positions, ``z[arange(N), pos] =
  new[arange(N), pos]`` for each per-prompt position tensor (the paper code's ``positions``);
* ``receiver_positions``: the receivers' ``q``/``k``/``v`` are patched only there, the same way;
* MLP senders: ``hook_mlp_out`` of the sender layer patched from ``x_new`` with all heads frozen;
* ``knockout``: an :class:`ioi.ablation.Ablation` whose hooks are added to every run (the paper
  code's ``extra_hooks``: passes A, B, C and D);
* ``freeze_mlps``: every MLP other than the sender frozen to its ``x_orig`` output.

Used by the tests (fast == reference) and the benchmark; not meant for real sweeps.
"""

from __future__ import annotations

import itertools
import time
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ioi.patching.path import (
    Positions,
    _assemble,
    _validate_receivers,
    positions_as_list,
    positions_mask,
)

__all__ = ["ref_path_patch_to_heads", "ref_path_patch_to_logits"]


def _z_name_filter(name: str) -> bool:
    return name.endswith("attn.hook_z")


def _patch_positions(act: Tensor, source: Tensor, positions: list[Tensor] | Tensor | None, index) -> Tensor:
    """Write ``source`` into ``act`` (at head ``index`` or the whole vector) at ``positions`` only."""
    if positions is None:
        if index is None:
            act[...] = source
        else:
            act[:, :, index] = source[:, :, index]
        return act
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:  # a [N, seq] mask
        mask = positions.view(*positions.shape, *([1] * (act.ndim - 2)))
        if index is None:
            act[...] = torch.where(mask, source, act)
        else:
            act[:, :, index] = torch.where(mask[:, :, 0], source[:, :, index], act[:, :, index])
        return act
    rows = torch.arange(act.shape[0], device=act.device)
    for pos in positions:
        if index is None:
            act[rows, pos] = source[rows, pos]
        else:
            act[rows, pos, index] = source[rows, pos, index]
    return act


def patch_or_freeze_head_vectors(
    orig_head_vector: Tensor,
    hook,
    new_cache,
    orig_cache,
    head_to_patch: tuple[int, int] | None,
    positions=None,
) -> Tensor:
    """Freeze all head outputs to ``orig_cache``, except ``head_to_patch`` (patched from
    ``new_cache``, only at ``positions`` when given). ``head_to_patch=None``: freeze only."""
    orig_head_vector[...] = orig_cache[hook.name][...]
    if head_to_patch is not None and head_to_patch[0] == hook.layer():
        _patch_positions(orig_head_vector, new_cache[hook.name], positions, head_to_patch[1])
    return orig_head_vector


def _patch_mlp(mlp_out: Tensor, hook, new_cache, positions=None) -> Tensor:
    return _patch_positions(mlp_out, new_cache[hook.name], positions, None)


def _freeze_mlp(mlp_out: Tensor, hook, orig_cache) -> Tensor:
    mlp_out[...] = orig_cache[hook.name][...]
    return mlp_out


def patch_head_input(
    orig_activation: Tensor, hook, patched_cache, head_list: list[tuple[int, int]], positions=None
) -> Tensor:
    """Patch the receivers' inputs of this layer from ``patched_cache`` (at ``positions`` only)."""
    heads_to_patch = [head for layer, head in head_list if layer == hook.layer()]
    if positions is None:
        orig_activation[:, :, heads_to_patch] = patched_cache[hook.name][:, :, heads_to_patch]
        return orig_activation
    for head in heads_to_patch:
        _patch_positions(orig_activation, patched_cache[hook.name], positions, head)
    return orig_activation


def _positions_arg(positions: Positions, n: int, seq: int, device):
    if positions is None:
        return None
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        return positions_mask(positions, n, seq, device)
    plist = positions_as_list(positions, n, device)
    positions_mask(plist, n, seq, device)  # range check
    return plist


def _sender_loop(senders: str, n_layers: int, n_heads: int, top: int):
    if senders not in ("heads", "mlps", "both"):
        raise ValueError(f"senders must be 'heads', 'mlps' or 'both'; got {senders!r}.")
    out = []
    if senders in ("heads", "both"):
        out += [("head", l, h) for l, h in itertools.product(range(top), range(n_heads))]
    if senders in ("mlps", "both"):
        out += [("mlp", l, None) for l in range(top)]
    return out


def _sender_hooks(model, sender, new_cache, orig_cache, positions, freeze_mlps: bool) -> list:
    kind, layer, head = sender
    hooks = [
        (
            _z_name_filter,
            partial(
                patch_or_freeze_head_vectors,
                new_cache=new_cache,
                orig_cache=orig_cache,
                head_to_patch=(layer, head) if kind == "head" else None,
                positions=positions,
            ),
        )
    ]
    if freeze_mlps:
        for l in range(model.cfg.n_layers):
            if kind == "mlp" and l == layer:
                continue
            hooks.append((f"blocks.{l}.hook_mlp_out", partial(_freeze_mlp, orig_cache=orig_cache)))
    return hooks


def _mlp_sender_hook(sender, new_cache, positions) -> list:
    kind, layer, _ = sender
    if kind != "mlp":
        return []
    return [(f"blocks.{layer}.hook_mlp_out", partial(_patch_mlp, new_cache=new_cache, positions=positions))]


def _cache_runs(model, orig_toks, new_toks, extra_hooks, names_filter):
    with model.hooks(fwd_hooks=list(extra_hooks)):
        _, new_cache = model.run_with_cache(new_toks, names_filter=names_filter, return_type=None)
        _, orig_cache = model.run_with_cache(orig_toks, names_filter=names_filter, return_type=None)
    return new_cache, orig_cache


def _elapsed(t0: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _record(timings: dict | None, key: str, seconds: float, append: bool = False) -> None:
    if timings is None:
        return
    if append:
        timings.setdefault(key, []).append(seconds)
    else:
        timings[key] = seconds


@torch.no_grad()
def ref_path_patch_to_logits(
    model,
    orig_toks: Tensor,
    new_toks: Tensor,
    metric: Callable[[Tensor], Tensor],
    *,
    sender_positions: Positions = None,
    senders: str = "heads",
    knockout=None,
    freeze_mlps: bool = False,
    sender_subset: Sequence[tuple] | None = None,
    progress: bool = True,
    timings: dict | None = None,
):
    """Seed-style path patching, each sender -> final residual stream (see module docstring).

    ``sender_subset``: only these senders (``(layer, head)`` for heads, ``(layer, None)`` for MLPs);
    the rest of the result is NaN (the benchmark times the reference on a subset). ``timings``: a
    dict to receive ``setup_seconds`` (step 1) and ``sender_seconds`` (one entry per sender).
    """
    device = model.W_U.device
    orig_toks, new_toks = orig_toks.to(device), new_toks.to(device)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    N, S = orig_toks.shape
    positions = _positions_arg(sender_positions, N, S, device)
    extra_hooks = [] if knockout is None else list(knockout.hooks())
    resid_post_hook_name = f"blocks.{L - 1}.hook_resid_post"
    resid_post_name_filter = lambda name: name == resid_post_hook_name  # noqa: E731

    # ========== Step 1 ==========  Gather activations on x_orig and x_new
    cache_filter = lambda name: _z_name_filter(name) or name.endswith("hook_mlp_out")  # noqa: E731
    t0 = time.perf_counter()
    new_cache, orig_cache = _cache_runs(model, orig_toks, new_toks, extra_hooks, cache_filter)
    _record(timings, "setup_seconds", _elapsed(t0))

    loop = _sender_loop(senders, L, H, L)
    if sender_subset is not None:
        wanted = {(int(l), None if h is None else int(h)) for l, h in sender_subset}
        loop = [s for s in loop if (s[1], s[2]) in wanted]
    values = {}
    for sender in tqdm(loop, desc="reference path patching -> logits", disable=not progress):
        t0 = time.perf_counter()
        # ========== Step 2 ==========  x_orig, sender patched from x_new, every other head frozen
        hooks = _sender_hooks(model, sender, new_cache, orig_cache, positions, freeze_mlps)
        hooks += extra_hooks + _mlp_sender_hook(sender, new_cache, positions)
        with model.hooks(fwd_hooks=hooks):
            _, patched_cache = model.run_with_cache(
                orig_toks, names_filter=resid_post_name_filter, return_type=None
            )
        # (the bridge also caches aliases of the same hook point, e.g. blocks.L.hook_out)
        if resid_post_hook_name not in patched_cache.keys():
            raise ValueError("Expected `blocks.<last>.hook_resid_post` in patched_cache")
        # ========== Step 3 ==========  unembed the final residual stream
        patched_logits = model.unembed(model.ln_final(patched_cache[resid_post_hook_name]))
        values[sender] = torch.as_tensor(metric(patched_logits)).detach().float()
        _record(timings, "sender_seconds", _elapsed(t0), append=True)
    return _assemble(values, senders, L, H, device)


@torch.no_grad()
def ref_path_patch_to_heads(
    model,
    orig_toks: Tensor,
    new_toks: Tensor,
    metric: Callable[[Tensor], Tensor],
    receivers: Sequence[tuple[int, int]],
    receiver_input: str,
    *,
    sender_positions: Positions = None,
    receiver_positions: Positions = None,
    senders: str = "heads",
    knockout=None,
    freeze_mlps: bool = False,
    sender_subset: Sequence[tuple] | None = None,
    progress: bool = True,
    timings: dict | None = None,
):
    """Seed-style path patching, each sender -> the receivers' ``q``/``k``/``v`` (module docstring).

    Result ``[n_layers, n_heads]`` (NaN for senders at or after the last receiver layer).
    ``sender_subset`` and ``timings`` as :func:`ref_path_patch_to_logits`.
    """
    device = model.W_U.device
    orig_toks, new_toks = orig_toks.to(device), new_toks.to(device)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    N, S = orig_toks.shape
    receiver_heads = _validate_receivers(receivers, receiver_input, L, H)
    s_positions = _positions_arg(sender_positions, N, S, device)
    r_positions = _positions_arg(receiver_positions, N, S, device)
    extra_hooks = [] if knockout is None else list(knockout.hooks())

    receiver_layers = set(next(zip(*receiver_heads)))
    receiver_hook_names = [f"blocks.{layer}.attn.hook_{receiver_input}" for layer in receiver_layers]
    receiver_hook_names_filter = lambda name: name in receiver_hook_names  # noqa: E731

    # ========== Step 1 ==========
    cache_filter = lambda name: _z_name_filter(name) or name.endswith("hook_mlp_out")  # noqa: E731
    t0 = time.perf_counter()
    new_cache, orig_cache = _cache_runs(model, orig_toks, new_toks, extra_hooks, cache_filter)
    _record(timings, "setup_seconds", _elapsed(t0))

    loop = _sender_loop(senders, L, H, max(receiver_layers))
    if sender_subset is not None:
        wanted = {(int(l), None if h is None else int(h)) for l, h in sender_subset}
        loop = [s for s in loop if (s[1], s[2]) in wanted]
    values = {}
    for sender in tqdm(loop, desc=f"reference path patching -> {receiver_input}", disable=not progress):
        t0 = time.perf_counter()
        # ========== Step 2 ==========  x_orig, sender patched from x_new, every other head frozen
        hooks = _sender_hooks(model, sender, new_cache, orig_cache, s_positions, freeze_mlps)
        hooks += extra_hooks + _mlp_sender_hook(sender, new_cache, s_positions)
        with model.hooks(fwd_hooks=hooks):
            _, patched_cache = model.run_with_cache(
                orig_toks, names_filter=receiver_hook_names_filter, return_type=None
            )
        assert set(receiver_hook_names) <= set(patched_cache.keys())  # plus the bridge's aliases
        # ========== Step 3 ==========  x_orig, receivers' inputs patched from the cached values
        hook_fn = partial(
            patch_head_input,
            patched_cache=patched_cache,
            head_list=receiver_heads,
            positions=r_positions,
        )
        patched_logits = model.run_with_hooks(
            orig_toks,
            fwd_hooks=extra_hooks + [(receiver_hook_names_filter, hook_fn)],
            return_type="logits",
        )
        values[sender] = torch.as_tensor(metric(patched_logits)).detach().float()
        _record(timings, "sender_seconds", _elapsed(t0), append=True)
    return _assemble(values, senders, L, H, device)
