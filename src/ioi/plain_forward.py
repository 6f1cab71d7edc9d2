"""Hook-free forward passes on plain tensors: END logits and activation caches without the bridge.

A ``TransformerBridge`` forward runs Hugging Face's GPT-2 modules (a Python GELU, the bridge's
attention reconstruction, a Python LayerNorm) and unembeds every position against the whole
vocabulary. When no hook has to run, the same numbers come from the processed weights as plain
tensors (:class:`ioi.patching._fast_forward.NetWeights`, the engine path patching uses; fused
kernels for the GELU, LayerNorm and attention). This module holds two such forwards:

* :func:`end_residual` / :func:`end_logits`: the final residual stream (and its logits) at each
  prompt's own END only. Every layer runs on every position up to END (causal attention: later
  positions never change END), except the last layer, where only END's query is projected and the
  attention output, MLP, ``ln_final`` and unembedding run on the END rows alone. Prompts are
  grouped by END (:func:`length_chunks`): each chunk is cut after its longest prompt's END, so right
  padding is never computed, and results come back in the caller's order.
* :func:`cache`: the activations at the hook points of :data:`SERVED_HOOKS` (TransformerLens names),
  the same values, shapes, dtype and device as the bridge's cache, computed up to the last layer a
  name needs.

Both equal the hooked bridge (:mod:`ioi.forward`'s ``engine="bridge"`` path, the slow reference)
to float32 rounding (tests: <= 1e-4 absolute) on the models :func:`unavailable_reason` accepts:
GPT-2-architecture float32 models (``ioi.patching._fast_forward.unsupported_reason``) with no hook
attached to them (``with model.hooks(...)`` sends the forward to the bridge, where the hooks run).
Set the environment variable ``IOI_FORWARD=bridge`` to send every forward through the bridge.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ioi.patching._fast_forward import NetWeights, net_weights, unsupported_reason

ENGINE_ENV = "IOI_FORWARD"  # "bridge": every forward through the hooked bridge; "plain"/unset: auto

# A chunk ends where END changes once it holds at least this many rows (prompts x positions), so
# prompts of one length run unpadded while short runs of a length are merged (matmul efficiency).
MIN_CHUNK_ROWS = 512

# Per-layer hook points served by :func:`cache` (suffix after ``blocks.{l}.``) -> what they hold.
_LAYER_HOOKS = {
    "hook_resid_pre": "resid_pre",
    "hook_in": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_out": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "attn.hook_q": "q",
    "attn.hook_k": "k",
    "attn.hook_v": "v",
    "attn.hook_z": "z",
    "attn.hook_pattern": "pattern",
}
# Hook points outside the blocks.
_GLOBAL_HOOKS = {
    "hook_embed": "embed",
    "hook_pos_embed": "pos_embed",
    "ln_final.hook_scale": "final_scale",
    "ln_final.hook_normalized": "final_normalized",
    "ln_final.hook_out": "final_out",
    "unembed.hook_in": "final_out",
}
SERVED_HOOKS = (*_GLOBAL_HOOKS, *(f"blocks.{{l}}.{suffix}" for suffix in _LAYER_HOOKS))
_LAYER_NAME = re.compile(r"blocks\.(\d+)\.(.+)")
_FINAL = ("final_scale", "final_normalized", "final_out")


def unavailable_reason(model) -> str | None:
    """``None`` when the plain forward reproduces ``model``'s hook-free forward, else why not."""
    if os.environ.get(ENGINE_ENV, "").strip().lower() == "bridge":
        return f"{ENGINE_ENV}=bridge is set"
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    dtype = model.W_U.dtype
    if dtype != torch.float32:
        return f"dtype {dtype} (the plain forward computes in float32)"
    if has_attached_hooks(model):
        return "hooks are attached to the model (model.hooks(...) / add_hook): they run on the bridge"
    return None


def has_attached_hooks(model) -> bool:
    """Whether a forward (pre-)hook is registered on one of the model's hook points (e.g. by
    ``with model.hooks(fwd_hooks=...)`` or ``hook_point.add_hook``) or on every module (torch's
    global hooks): the bridge must then run. (The bridge's own hooks on the wrapped Hugging Face
    modules, registered at its first forward, are not user hooks and are not looked at.)"""
    from torch.nn.modules import module as nn_module
    from transformer_lens.hook_points import HookPoint

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    hook_dict = getattr(model, "hook_dict", None)
    points = hook_dict.values() if hook_dict else (m for m in model.modules() if isinstance(m, HookPoint))
    return any(point._forward_hooks or point._forward_pre_hooks for point in points)


def weights(model) -> NetWeights:
    """The model's processed weights as plain tensors on its device (cached per model)."""
    return net_weights(model, model.W_U.device)


def parse_hook(name: str, n_layers: int) -> tuple[int | None, str] | None:
    """``"blocks.3.attn.hook_z"`` -> ``(3, "z")``, ``"hook_embed"`` -> ``(None, "embed")``; ``None``
    when :func:`cache` does not serve the name (the bridge then computes the whole cache)."""
    if name in _GLOBAL_HOOKS:
        return None, _GLOBAL_HOOKS[name]
    match = _LAYER_NAME.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_HOOKS:
        return None
    layer = int(match.group(1))
    return (layer, _LAYER_HOOKS[match.group(2)]) if layer < n_layers else None


def _check_length(net: NetWeights, n_pos: int) -> None:
    if n_pos > net.W_pos.shape[0]:
        raise ValueError(f"Prompts of {n_pos} tokens exceed the model's context of {net.W_pos.shape[0]} "
                         "positions: shorten them.")


# ----------------------------------------------------------------------------------------------
# END rows only
# ----------------------------------------------------------------------------------------------


def _end_attention(net: NetWeights, layer: int, x: Tensor, end: Tensor, causal_ok: bool) -> Tensor:
    """Attention output (``z @ W_O + b_O``) at each prompt's END, ``[batch, d_model]``.

    ``x`` is ``ln1``'s output at every position; keys and values are projected at every position,
    the query at END only; keys after END are masked (``causal_ok``: END is every prompt's last
    position, so nothing needs masking).
    """
    n, n_pos, _ = x.shape
    H, dh, hd = net.n_heads, net.d_head, net.hd
    kv = net.linear(x, net.W_kv[layer], net.b_kv[layer]).view(n, n_pos, 2, H, dh)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [batch, head, pos, d_head]
    rows = torch.arange(n, device=x.device)
    q = torch.addmm(net.b_q[layer], x[rows, end], net.W_q[layer]).view(n, H, 1, dh)
    mask = None
    if not causal_ok:
        mask = (torch.arange(n_pos, device=x.device)[None, :] <= end[:, None]).view(n, 1, 1, n_pos)
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=net.attn_scales[layer])
    return torch.addmm(net.b_O[layer], z.reshape(n, hd), net.W_O_flat[layer])


@torch.no_grad()
def end_residual(
    net: NetWeights, toks: Int[Tensor, "batch pos"], end: Int[Tensor, "batch"]
) -> Float[Tensor, "batch d_model"]:
    """The final residual stream (the input of ``ln_final``) at each prompt's END, one batch.

    ``toks`` (on ``net``'s device) may be right-padded; positions after a prompt's END only run as
    keys of nothing (causal attention), so they cannot change the result.
    """
    n, n_pos = toks.shape
    _check_length(net, n_pos)
    end = end.to(toks.device)
    resid = net.W_E[toks] + net.W_pos[:n_pos]  # a fresh tensor: updated in place below
    last = net.n_layers - 1
    for layer in range(last):
        qkv = net.linear(net.ln(resid, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])
        z, _ = net.attention(layer, *net.split_qkv(qkv))
        resid = net.add_mlp_(layer, net.add_attn_out_(layer, resid, z))
    rows = torch.arange(n, device=toks.device)
    causal_ok = bool((end == n_pos - 1).all())
    at_end = resid[rows, end] + _end_attention(net, last, net.ln(resid, net.ln1[last]), end, causal_ok)
    return net.add_mlp_(last, at_end)


def length_chunks(end: Int[Tensor, "batch"], max_prompts: int, min_rows: int = MIN_CHUNK_ROWS) -> list[Tensor]:
    """Prompt indices in chunks of at most ``max_prompts``, sorted by END (stable).

    A chunk also ends where END changes once it holds ``min_rows`` rows (prompts x positions up to
    its longest END), so each long enough run of equal lengths is computed without padding.
    """
    end = end.cpu()
    order = torch.argsort(end, stable=True)
    lengths = (end[order] + 1).tolist()
    chunks, start = [], 0
    for i in range(1, len(lengths) + 1):
        if (i == len(lengths) or i - start >= max_prompts
                or (lengths[i] != lengths[i - 1] and (i - start) * lengths[i - 1] >= min_rows)):
            chunks.append(order[start:i])
            start = i
    return chunks


@torch.no_grad()
def end_logits(
    net: NetWeights, toks: Int[Tensor, "batch seq"], end: Int[Tensor, "batch"], max_prompts: int
) -> Float[Tensor, "batch vocab"]:
    """Logits at each prompt's END (float32, on the CPU, in the order given), in
    :func:`length_chunks` of at most ``max_prompts`` prompts, each cut after its longest END."""
    end_cpu = end.cpu()
    out = torch.empty(len(end_cpu), net.W_U.shape[1], dtype=torch.float32, device="cpu")
    for chunk in length_chunks(end_cpu, max_prompts):
        ends = end_cpu[chunk]
        part = toks[chunk.to(toks.device), : int(ends.max()) + 1].to(net.device)
        out[chunk] = net.logits(end_residual(net, part, ends.to(net.device))).float().cpu()
    return out


# ----------------------------------------------------------------------------------------------
# END rows of several continuations of one shared prefix per prompt
# ----------------------------------------------------------------------------------------------

PrefixKV = list[tuple[Tensor, Tensor]]  # per layer: keys, values [batch, n_heads, prefix_pos, d_head]


@torch.no_grad()
def prefix_keys_values(net: NetWeights, prefix: Int[Tensor, "batch prefix_pos"]) -> PrefixKV:
    """Every layer's keys and values at the prefix positions (a plain causal forward of ``prefix``;
    the last layer's attention output and every layer's queries of the last layer are not needed).

    Right padding of ``prefix`` is harmless: causal attention keeps a position's keys and values
    independent of later positions, and :func:`end_residual_after_prefix` masks the padded ones.
    """
    n, n_pos = prefix.shape
    _check_length(net, n_pos)
    resid = net.W_E[prefix] + net.W_pos[:n_pos]
    last = net.n_layers - 1
    out: PrefixKV = []
    for layer in range(net.n_layers):
        x = net.ln(resid, net.ln1[layer])
        if layer == last:
            kv = net.linear(x, net.W_kv[layer], net.b_kv[layer]).view(n, n_pos, 2, net.n_heads, net.d_head)
            out.append((kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)))
            break
        q, k, v = net.split_qkv(net.linear(x, net.W_qkv[layer], net.b_qkv[layer]))
        out.append((k.transpose(1, 2), v.transpose(1, 2)))
        z, _ = net.attention(layer, q, k, v)
        resid = net.add_mlp_(layer, net.add_attn_out_(layer, resid, z))
    return out


@torch.no_grad()
def end_residual_after_prefix(
    net: NetWeights,
    prefix_kv: PrefixKV,
    prefix_len: Int[Tensor, "batch"],
    suffix: Int[Tensor, "batch suffix_pos"],
    end: Int[Tensor, "batch"],
) -> Float[Tensor, "batch d_model"]:
    """The final residual stream at END of the prompts ``prefix[i, :prefix_len[i]] + suffix[i]``,
    ``end`` indexing into ``suffix`` (the prompt's END is at ``prefix_len + end``).

    The same numbers as :func:`end_residual` on the spliced prompts (to float32 rounding: causal
    attention makes the prefix's keys and values those of any continuation): the suffix rows run
    every layer at positions ``prefix_len + j``, attending to the prefix's cached keys and values
    (:func:`prefix_keys_values`; its padded positions masked) and causally to the suffix; the last
    layer runs END's query, attention output and MLP only. Right padding of ``suffix`` is never
    attended to by a row at or before its END.
    """
    n, n_suffix = suffix.shape
    device = suffix.device
    prefix_len, end = prefix_len.to(device), end.to(device)
    n_prefix = prefix_kv[0][0].shape[2]
    steps = torch.arange(n_suffix, device=device)
    positions = prefix_len[:, None] + steps  # [batch, suffix_pos]
    _check_length(net, int(positions.gather(1, end[:, None]).max()) + 1)
    positions = positions.clamp(max=net.W_pos.shape[0] - 1)  # right padding only
    in_prefix = torch.arange(n_prefix, device=device)[None, :] < prefix_len[:, None]  # [batch, prefix_pos]
    causal = steps[None, :] <= steps[:, None]  # [suffix_pos (query), suffix_pos (key)]
    mask = torch.cat([in_prefix[:, None, :].expand(n, n_suffix, n_prefix),
                      causal[None].expand(n, -1, -1)], -1)[:, None]  # [batch, 1, query, key]
    H, dh = net.n_heads, net.d_head
    resid = net.W_E[suffix] + net.W_pos[positions]
    last = net.n_layers - 1
    for layer in range(last):
        q, k, v = (t.transpose(1, 2) for t in net.split_qkv(
            net.linear(net.ln(resid, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])))
        k_prefix, v_prefix = prefix_kv[layer]
        z = F.scaled_dot_product_attention(q, torch.cat([k_prefix, k], 2), torch.cat([v_prefix, v], 2),
                                           attn_mask=mask, scale=net.attn_scales[layer])
        resid = net.add_mlp_(layer, net.add_attn_out_(layer, resid, z.transpose(1, 2)))
    x = net.ln(resid, net.ln1[last])
    kv = net.linear(x, net.W_kv[last], net.b_kv[last]).view(n, n_suffix, 2, H, dh)
    rows = torch.arange(n, device=device)
    q = torch.addmm(net.b_q[last], x[rows, end], net.W_q[last]).view(n, H, 1, dh)
    k_prefix, v_prefix = prefix_kv[last]
    end_mask = torch.cat([in_prefix, steps[None, :] <= end[:, None]], -1).view(n, 1, 1, -1)
    z = F.scaled_dot_product_attention(q, torch.cat([k_prefix, kv[:, :, 0].transpose(1, 2)], 2),
                                       torch.cat([v_prefix, kv[:, :, 1].transpose(1, 2)], 2),
                                       attn_mask=end_mask, scale=net.attn_scales[last])
    at_end = resid[rows, end] + torch.addmm(net.b_O[last], z.reshape(n, net.hd), net.W_O_flat[last])
    return net.add_mlp_(last, at_end)


@torch.no_grad()
def end_logits_shared_prefix(
    net: NetWeights,
    toks: Sequence[Int[Tensor, "batch seq"]],
    end: Sequence[Int[Tensor, "batch"]],
    prefix_len: Int[Tensor, "batch"],
    max_prompts: int,
) -> list[Float[Tensor, "batch vocab"]]:
    """END logits (float32, on the CPU, in the order given) of several prompt sets ``toks[j]``
    (right-padded, END at ``end[j]``) whose prompt ``i`` all begin with the same
    ``prefix_len[i]`` tokens (checked), each set as :func:`end_logits` computes it (to float32
    rounding), with the shared prefix run once per prompt (:func:`prefix_keys_values`) instead of
    once per set. Prompts run in :func:`length_chunks` of at most ``max_prompts`` by prefix length
    (the prefix pass), each set's rows of a chunk regrouped by suffix length (the suffix passes), so
    little padding is computed."""
    prefix_len = torch.as_tensor(prefix_len).cpu().long()
    n = len(prefix_len)
    ends = [torch.as_tensor(e).cpu().long() for e in end]
    if any(len(e) != n or t.shape[0] != n for t, e in zip(toks, ends)) or len(toks) != len(ends):
        raise ValueError("end_logits_shared_prefix: one END and one prefix length per prompt of every set.")
    if n and any(bool(((prefix_len < 1) | (prefix_len > e)).any()) for e in ends):
        raise ValueError("end_logits_shared_prefix: each prefix must hold 1..END tokens of its prompt.")
    width = int(prefix_len.max()) if n else 0
    shared = toks[0][:, :width].cpu()
    keep = torch.arange(width)[None, :] < prefix_len[:, None]
    for t in toks[1:]:
        if not bool(((t[:, :width].cpu() == shared) | ~keep).all()):
            raise ValueError("end_logits_shared_prefix: the prompt sets differ within a prompt's prefix.")
    outs = [torch.empty(n, net.W_U.shape[1], dtype=torch.float32, device="cpu") for _ in toks]
    for chunk in length_chunks(prefix_len - 1, max(1, max_prompts)) if n else []:
        lens = prefix_len[chunk]
        kv = prefix_keys_values(net, toks[0][chunk, : int(lens.max())].to(net.device))
        for t, e, out in zip(toks, ends, outs):
            suffix_end = e[chunk] - lens
            # each set's rows of the chunk regrouped by their suffix length (no suffix padding)
            for part in length_chunks(suffix_end, len(chunk)):
                part_lens, part_end = lens[part], suffix_end[part]
                index = (part_lens[:, None] + torch.arange(int(part_end.max()) + 1)).clamp(max=t.shape[1] - 1)
                suffix = t[chunk[part]].cpu().gather(1, index).to(net.device)
                on_device = part.to(net.device)
                part_kv = [(k.index_select(0, on_device), v.index_select(0, on_device)) for k, v in kv]
                resid = end_residual_after_prefix(net, part_kv, part_lens.to(net.device), suffix,
                                                  part_end.to(net.device))
                out[chunk[part]] = net.logits(resid).float().cpu()
    return outs


# ----------------------------------------------------------------------------------------------
# Activation caches
# ----------------------------------------------------------------------------------------------


def servable(names: Iterable[str], n_layers: int) -> bool:
    """Whether :func:`cache` serves every one of ``names``."""
    return all(parse_hook(name, n_layers) is not None for name in names)


@torch.no_grad()
def cache(net: NetWeights, toks: Int[Tensor, "batch pos"], names: Sequence[str]) -> dict[str, Tensor]:
    """The activations at hook points ``names`` (all :func:`servable`), as the bridge caches them.

    Shapes follow TransformerLens: residual-stream hooks ``[batch, pos, d_model]``, ``attn.hook_q``
    / ``k`` / ``v`` / ``z`` ``[batch, pos, n_heads, d_head]``, ``attn.hook_pattern``
    ``[batch, n_heads, dest, src]`` (post-softmax, zero above the diagonal), ``hook_pos_embed``
    ``[batch, pos, d_model]``, ``ln_final.hook_scale`` ``[batch, pos, 1]`` (``sqrt(var + eps)``),
    ``ln_final.hook_normalized`` (centred and scaled, before ``ln_final``'s weight and bias),
    ``unembed.hook_in`` = ``ln_final.hook_out``. Layers after the last one a name needs are not run.
    """
    n, n_pos = toks.shape
    _check_length(net, n_pos)
    parsed = {name: parse_hook(name, net.n_layers) for name in names}
    unserved = [name for name, spec in parsed.items() if spec is None]
    if unserved:
        raise KeyError(f"The plain forward does not serve {unserved[:5]}.")
    per_layer: dict[int, set[str]] = {}
    globals_wanted = set()
    for layer, kind in parsed.values():
        if layer is None:
            globals_wanted.add(kind)
        else:
            per_layer.setdefault(layer, set()).add(kind)
    final = bool(globals_wanted & set(_FINAL))
    last = net.n_layers - 1 if final else max(per_layer, default=-1)

    values: dict[tuple[int | None, str], Tensor] = {}
    embed = net.W_E[toks]
    pos_embed = net.W_pos[:n_pos]
    if "embed" in globals_wanted:
        values[None, "embed"] = embed
    if "pos_embed" in globals_wanted:
        values[None, "pos_embed"] = pos_embed.expand(n, -1, -1).clone()
    resid = embed + pos_embed
    for layer in range(last + 1):
        kinds = per_layer.get(layer, set())
        if "resid_pre" in kinds:
            values[layer, "resid_pre"] = resid
        qkv = net.linear(net.ln(resid, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])
        q, k, v = net.split_qkv(qkv)
        for kind, t in (("q", q), ("k", k), ("v", v)):
            if kind in kinds:
                values[layer, kind] = t.contiguous()
        z, pattern = net.attention(layer, q, k, v, return_pattern="pattern" in kinds)
        z = z.contiguous()
        if "pattern" in kinds:
            values[layer, "pattern"] = pattern
        if "z" in kinds:
            values[layer, "z"] = z
        attn_out = net.attn_out_from_z(layer, z.view(n, n_pos, net.hd))
        if "attn_out" in kinds:
            values[layer, "attn_out"] = attn_out
        resid = resid + attn_out  # never in place: an earlier tensor may be held in the cache
        if "resid_mid" in kinds:
            values[layer, "resid_mid"] = resid
        if layer == last and not final and not kinds & {"mlp_out", "resid_post"}:
            break
        if not net.attn_only:
            mlp_out = net.mlp(layer, resid)
            if "mlp_out" in kinds:
                values[layer, "mlp_out"] = mlp_out
            resid = resid + mlp_out
        if "resid_post" in kinds:
            values[layer, "resid_post"] = resid
    if final:
        centred = resid - resid.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + net.eps).sqrt()
        values[None, "final_scale"] = scale
        normalized = centred / scale
        values[None, "final_normalized"] = normalized
        w, b = net.ln_final
        out = normalized if w is None else normalized * w
        values[None, "final_out"] = out if b is None else out + b
    return {name: values[spec] for name, spec in parsed.items()}


# ----------------------------------------------------------------------------------------------
# Patches at END only: every other row keeps its clean value
# ----------------------------------------------------------------------------------------------


class EndRun:
    """A clean plain forward that keeps, per layer, the residual stream at each prompt's END and
    the keys and values of every position, so that runs changing only END rows (patches of
    ``hook_z`` at END, :meth:`resume`) recompute one row per prompt and layer: under causal
    attention a change at END leaves every earlier position as it was, and positions after END
    are never read.
    """

    def __init__(self, net: NetWeights, toks: Int[Tensor, "batch pos"], end: Int[Tensor, "batch"]):
        n, n_pos = toks.shape
        _check_length(net, n_pos)
        self.net = net
        self.end = end.to(net.device)
        self.rows = torch.arange(n, device=net.device)
        resid = net.W_E[toks.to(net.device)] + net.W_pos[:n_pos]
        self.resid_end: list[Tensor] = []  # resid_pre at END, per layer; [n_layers] = final
        self.kv: list[Tensor] = []  # [batch, pos, 2 * hd] per layer
        for layer in range(net.n_layers):
            self.resid_end.append(resid[self.rows, self.end])
            qkv = net.linear(net.ln(resid, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])
            self.kv.append(qkv[..., net.hd :].contiguous())
            z, _ = net.attention(layer, *net.split_qkv(qkv))
            resid = net.add_mlp_(layer, net.add_attn_out_(layer, resid, z))
        self.resid_end.append(resid[self.rows, self.end])
        positions = torch.arange(n_pos, device=net.device)
        self.mask = positions[None, :] > self.end[:, None]  # [batch, pos]: keys after END

    @torch.no_grad()
    def resume(
        self,
        start_layer: int,
        z_at_end: dict[int, tuple[Sequence[int], Tensor]] | None = None,
        pattern_layers: Sequence[int] = (),
    ) -> tuple[Float[Tensor, "batch d_model"], dict[int, Float[Tensor, "batch n_heads pos"]]]:
        """The final residual stream at END (before ``ln_final``) when the END rows are recomputed
        from ``start_layer`` on, with ``z[prompt, END, heads]`` of layer ``l`` replaced by
        ``z_at_end[l] = (heads, values [batch, len(heads), d_head])``; and the attention pattern
        from END (``[batch, n_heads, pos]``, post-softmax) of each layer in ``pattern_layers``
        (which must be >= ``start_layer``; the pattern is read before the layer's z is patched, as
        the hooks ``attn.hook_pattern`` and ``attn.hook_z`` fire in that order)."""
        net = self.net
        z_at_end = z_at_end or {}
        if any(l < start_layer for l in (*z_at_end, *pattern_layers)):
            raise ValueError("patched and read layers must be >= start_layer")
        H, dh, hd = net.n_heads, net.d_head, net.hd
        resid = self.resid_end[start_layer].clone()
        patterns: dict[int, Tensor] = {}
        n = len(self.rows)
        for layer in range(start_layer, net.n_layers):
            x = net.ln(resid, net.ln1[layer])
            qkv = torch.addmm(net.b_qkv[layer], x, net.W_qkv[layer])  # [batch, 3 hd]
            q = qkv[:, :hd].view(n, H, 1, dh)
            kv = self.kv[layer].clone()
            kv[self.rows, self.end] = qkv[:, hd:]
            k = kv[..., :hd].view(n, -1, H, dh).transpose(1, 2)  # [batch, head, pos, d_head]
            v = kv[..., hd:].view(n, -1, H, dh).transpose(1, 2)
            scores = (q @ k.transpose(-1, -2))[:, :, 0] * net.attn_scales[layer]  # [batch, head, pos]
            pattern = scores.masked_fill(self.mask[:, None, :], float("-inf")).softmax(-1)
            if layer in pattern_layers:
                patterns[layer] = pattern
            z = (pattern[:, :, None, :] @ v)[:, :, 0]  # [batch, head, d_head]
            if layer in z_at_end:
                heads, values = z_at_end[layer]
                z[:, list(heads)] = values.to(z.dtype)
            resid = resid + torch.addmm(net.b_O[layer], z.reshape(n, hd), net.W_O_flat[layer])
            resid = net.add_mlp_(layer, resid)
        return resid, patterns

    def answer_logit_diff(self, final: Float[Tensor, "batch d_model"], io: Tensor, s: Tensor) -> Tensor:
        """``logit(IO) - logit(S)`` of END rows already through the blocks (``ln_final`` applied)."""
        io_logit, s_logit = self.net.answer_logits(final, io.to(final.device), s.to(final.device))
        return io_logit - s_logit
