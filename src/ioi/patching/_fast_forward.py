"""A plain-tensor re-implementation of a GPT-2-style TransformerBridge forward, for fast patching.

TransformerBridge's ``start_at_layer`` still executes the blocks before the start layer, and every
bridge forward computes logits for every position and the whole vocabulary. Activation patching
needs neither: a patch at layer ``L`` leaves everything before ``L`` (and every position before the
first changed one) equal to the corrupted run, and an ``ioi.metrics.LogitDiff`` only reads two
logits at each prompt's END. This module holds

* :class:`NetWeights` - the bridge's processed weights in TransformerLens layout (read once per
  model, cached), with the small set of architecture checks that make the re-implementation exact;
* :class:`CorruptedRun` - one full forward on the corrupted tokens, keeping per layer the residual
  stream (``resid_pre``, ``resid_mid``), the fused ``q|k|v`` projections and (when head patches are
  asked for) ``z``;
* :class:`RowSet` - which (prompt, position) rows a group of patches can change: from each prompt's
  first changed position to its last needed one (END for a LogitDiff, the last position otherwise);
* :class:`ResumeForward` - the batched "resume" forward: ``K`` patched residual streams that join
  the computation at their own (layer, stage), recomputing only the rows of the :class:`RowSet`
  (keys and values of all other rows come from the corrupted run) and, for a LogitDiff, only the
  END rows in the last layer (whose keys/values are never projected: see
  :meth:`ResumeForward._attention_block_end`) and only the IO/S columns of the unembedding;
* :meth:`NetWeights.add_mlp_low_rank_` - the MLP after a head patch, whose input changed by a
  rank-``d_head`` term, with a ``d_head``-deep instead of ``d_model``-deep input projection.

Every shortcut is exact (causal attention, position-wise MLPs and LayerNorms); results equal a full
TransformerLens forward up to float32 rounding (tests: <= 1e-4 absolute).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

STAGES = ("pre", "mid", "post")
_STAGE_ORDER = {stage: i for i, stage in enumerate(STAGES)}

# Rows per MLP tile on a CPU: a tile's [rows, d_mlp] hidden activations then stay in cache between
# the input projection, the activation function and the output projection (same numbers; ~25%
# faster than one [thousands, d_mlp] pass on a 2-core CPU). GPUs take the whole batch at once.
MLP_ROW_TILE = 1024


def row_tiles(n_rows: int, device: torch.device) -> list[slice]:
    """Consecutive row slices of at most :data:`MLP_ROW_TILE` rows (one slice off the CPU)."""
    if device.type != "cpu" or n_rows <= MLP_ROW_TILE:
        return [slice(0, n_rows)]
    return [slice(start, start + MLP_ROW_TILE) for start in range(0, n_rows, MLP_ROW_TILE)]


def patch_row_tiles(n_patches: int, n_rows: int, device: torch.device) -> list[tuple[slice, slice]]:
    """``(patches, rows)`` slices tiling a ``[n_patches, n_rows, ...]`` batch into blocks of about
    :data:`MLP_ROW_TILE` rows (whole patches x a block of rows); one block off the CPU."""
    if device.type != "cpu":
        return [(slice(0, n_patches), slice(0, n_rows))]
    row_block = max(1, min(n_rows, MLP_ROW_TILE))
    patch_block = max(1, MLP_ROW_TILE // row_block)
    return [
        (slice(p0, p0 + patch_block), slice(r0, r0 + row_block))
        for p0 in range(0, n_patches, patch_block)
        for r0 in range(0, n_rows, row_block)
    ]


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


_ACTIVATIONS_INPLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": lambda x: torch._C._nn.gelu_(x, approximate="tanh"),
    "gelu_fast": lambda x: torch._C._nn.gelu_(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch._C._nn.gelu_(x, approximate="tanh"),
    "gelu": lambda x: torch._C._nn.gelu_(x),
    "relu": torch.relu_,
    "silu": lambda x: F.silu(x, inplace=True),
}


class UnsupportedModelError(NotImplementedError):
    """The model's architecture is outside what the fast re-implementation reproduces exactly."""


def unsupported_reason(model) -> str | None:
    """``None`` when :class:`NetWeights` reproduces ``model`` exactly, else the reason it cannot."""
    cfg = model.cfg
    checks = [
        (getattr(cfg, "positional_embedding_type", "standard") == "standard",
         "positional_embedding_type must be 'standard'"),
        (getattr(cfg, "normalization_type", "LN") in ("LN", "LNPre"), "LayerNorm models only"),
        (not getattr(cfg, "uses_rms_norm", False), "RMSNorm is not supported"),
        (not getattr(cfg, "parallel_attn_mlp", False), "parallel attention/MLP blocks"),
        (getattr(cfg, "act_fn", None) in _ACTIVATIONS, f"activation {getattr(cfg, 'act_fn', None)!r}"),
        (getattr(cfg, "n_key_value_heads", None) in (None, cfg.n_heads), "grouped-query attention"),
        (not getattr(cfg, "gated_mlp", False), "gated MLPs"),
        (getattr(cfg, "attention_dir", "causal") == "causal", "non-causal attention"),
        (not getattr(cfg, "use_local_attn", False), "local attention"),
        (not getattr(cfg, "use_qk_norm", False), "QK norm"),
        (not getattr(cfg, "post_embedding_ln", False), "post-embedding LayerNorm"),
        (not getattr(cfg, "use_normalization_before_and_after", False), "sandwich norms"),
        (getattr(cfg, "attn_scores_soft_cap", -1.0) in (None, -1.0, 0.0), "attention soft-capping"),
        (getattr(cfg, "output_logits_soft_cap", -1.0) in (None, -1.0, 0.0), "logit soft-capping"),
        (not getattr(cfg, "scale_embedding", False), "scaled embeddings"),
        ((getattr(cfg, "num_experts", None) or 0) == 0, "mixture-of-experts"),
        (getattr(cfg, "architecture", "GPT2LMHeadModel") in (None, "GPT2LMHeadModel"),
         f"architecture {getattr(cfg, 'architecture', None)!r} (GPT-2 only)"),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    return None


def _ln_params(ln_module) -> tuple[Tensor | None, Tensor | None]:
    """LayerNorm weight and bias of a bridge normalisation component (None when identity)."""
    w = getattr(ln_module, "w", None)
    b = getattr(ln_module, "b", None)
    if w is None and getattr(ln_module, "original_component", None) is not None:
        w = getattr(ln_module.original_component, "weight", None)
        b = getattr(ln_module.original_component, "bias", None)
    w = None if w is None or bool((w == 1).all()) else w.detach()
    b = None if b is None or bool((b == 0).all()) else b.detach()
    return w, b


@dataclasses.dataclass
class NetWeights:
    """A GPT-2-style transformer's weights in TransformerLens layout, on one device.

    ``W_qkv[l]`` is ``[d_model, 3 * n_heads * d_head]`` (``q | k | v``, head-major within each),
    ``W_O[l]`` is ``[n_heads, d_head, d_model]``; LayerNorm weights are ``None`` when folded.
    """

    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    eps: float
    act_fn: str
    attn_only: bool
    attn_scales: list[float]
    W_E: Float[Tensor, "d_vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    W_qkv: Float[Tensor, "n_layers d_model three_hd"]
    b_qkv: Float[Tensor, "n_layers three_hd"]
    W_O: Float[Tensor, "n_layers n_heads d_head d_model"]
    b_O: Float[Tensor, "n_layers d_model"]
    W_in: Float[Tensor, "n_layers d_model d_mlp"] | None
    b_in: Float[Tensor, "n_layers d_mlp"] | None
    W_out: Float[Tensor, "n_layers d_mlp d_model"] | None
    b_out: Float[Tensor, "n_layers d_model"] | None
    ln1: list[tuple[Tensor | None, Tensor | None]]
    ln2: list[tuple[Tensor | None, Tensor | None]]
    ln_final: tuple[Tensor | None, Tensor | None]
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, "d_vocab"]
    W_q: Float[Tensor, "n_layers d_model hd"] | None = None
    b_q: Float[Tensor, "n_layers hd"] | None = None
    W_kv: Float[Tensor, "n_layers d_model two_hd"] | None = None
    b_kv: Float[Tensor, "n_layers two_hd"] | None = None
    W_O_flat: Float[Tensor, "n_layers hd d_model"] | None = None
    W_K_heads: Float[Tensor, "n_layers n_heads d_model d_head"] | None = None
    W_V_heads: Float[Tensor, "n_layers n_heads d_model d_head"] | None = None
    b_K_heads: Float[Tensor, "n_layers n_heads d_head"] | None = None
    b_V_heads: Float[Tensor, "n_layers n_heads d_head"] | None = None

    def __post_init__(self) -> None:
        hd = self.n_heads * self.d_head
        self.W_q = self.W_qkv[..., :hd].contiguous()
        self.b_q = self.b_qkv[..., :hd].contiguous()
        self.W_kv = self.W_qkv[..., hd:].contiguous()
        self.b_kv = self.b_qkv[..., hd:].contiguous()
        self.W_O_flat = self.W_O.reshape(self.n_layers, hd, self.d_model).contiguous()

        def per_head(W: Tensor) -> Tensor:  # [L, D, H*dh] -> [L, H, D, dh]
            return W.reshape(self.n_layers, self.d_model, self.n_heads, self.d_head).permute(0, 2, 1, 3).contiguous()

        self.W_K_heads = per_head(self.W_qkv[..., hd : 2 * hd])
        self.W_V_heads = per_head(self.W_qkv[..., 2 * hd :])
        self.b_K_heads = self.b_qkv[..., hd : 2 * hd].reshape(self.n_layers, self.n_heads, self.d_head)
        self.b_V_heads = self.b_qkv[..., 2 * hd :].reshape(self.n_layers, self.n_heads, self.d_head)

    @property
    def hd(self) -> int:
        return self.n_heads * self.d_head

    @property
    def d_mlp(self) -> int:
        return 0 if self.W_in is None else self.W_in.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    def act(self, x: Tensor) -> Tensor:
        return _ACTIVATIONS[self.act_fn](x)

    def act_(self, x: Tensor) -> Tensor:
        """The activation function applied in place (the same numbers as :meth:`act`)."""
        return _ACTIVATIONS_INPLACE[self.act_fn](x)

    # -- building blocks ----------------------------------------------------------------------

    def ln(self, x: Tensor, params: tuple[Tensor | None, Tensor | None]) -> Tensor:
        return F.layer_norm(x, (self.d_model,), params[0], params[1], self.eps)

    def linear(self, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        """``x @ W + b`` over the last axis of ``x`` (any leading shape)."""
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(b, flat, W) if b is not None else flat @ W
        return out.view(*x.shape[:-1], W.shape[-1])

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """The MLP's output (not yet added to ``resid``), any leading shape; in row tiles on a CPU."""
        rows = resid.reshape(-1, resid.shape[-1])
        tiles = row_tiles(len(rows), rows.device)
        if len(tiles) == 1:
            return self._mlp_rows(layer, rows).view(resid.shape)
        out = torch.empty_like(rows)
        for tile in tiles:
            out[tile] = self._mlp_rows(layer, rows[tile])
        return out.view(resid.shape)

    def _mlp_rows(self, layer: int, rows: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows d_model"]:
        hidden = torch.addmm(self.b_in[layer], self.ln(rows, self.ln2[layer]), self.W_in[layer])
        # the activation in place on the fresh pre-activation when no gradient flows (same numbers)
        hidden = self.act(hidden) if hidden.requires_grad else self.act_(hidden)
        return torch.addmm(self.b_out[layer], hidden, self.W_out[layer])

    def add_mlp_(self, layer: int, resid: Tensor) -> Tensor:
        """``resid + mlp(resid)``, written into ``resid`` (which must be a fresh, owned tensor)."""
        if self.attn_only:
            return resid
        flat = resid.view(-1, self.d_model)
        tiles = row_tiles(len(flat), flat.device)
        # one hidden buffer for every tile, the activation in place (same numbers, fewer fresh pages)
        buffer = flat.new_empty(min(len(flat), tiles[0].stop - tiles[0].start), self.d_mlp)
        for tile in tiles:
            rows = flat[tile]
            hidden = buffer[: len(rows)]
            torch.addmm(self.b_in[layer], self.ln(rows, self.ln2[layer]), self.W_in[layer], out=hidden)
            self.act_(hidden)
            # accumulated into the rows in place, in the same order as ever (rounding unchanged)
            rows.addmm_(hidden, self.W_out[layer]).add_(self.b_out[layer])
        return resid

    # -- MLP after a low-rank change of its input (head patches) ------------------------------
    #
    # With x = r + dz @ W_O[h] (a head patch adds a rank-d_head change to resid_mid), the MLP's
    # pre-activation is  LN2(x) @ W_in + b_in = ((c(r) + dz @ c(W_O[h])) * w) @ W_in / s(x) + b'
    # with c() the centring over d_model, w/b LN2's weight/bias, b' = b @ W_in + b_in and s(x)
    # LN2's scale. ``(c(r) * w) @ W_in`` is shared by every head patch of the layer and
    # ``(c(W_O[h]) * w) @ W_in`` is a [d_head, d_mlp] matrix, so each patch costs a d_head- instead
    # of a d_model-deep matmul for W_in (same maths, reassociated).

    def mlp_in_head_factors(self, layer: int) -> Float[Tensor, "n_heads d_head d_mlp"]:
        """``(c(W_O[h]) * w) @ W_in`` for every head ``h`` of ``layer``."""
        W_O = self.W_O[layer]
        centred = W_O - W_O.mean(-1, keepdim=True)
        w = self.ln2[layer][0]
        if w is not None:
            centred = centred * w
        return (centred.reshape(-1, self.d_model) @ self.W_in[layer]).view(self.n_heads, self.d_head, -1)

    def mlp_in_head_factors_cached(self, layer: int) -> Float[Tensor, "n_heads d_head d_mlp"]:
        """:meth:`mlp_in_head_factors`, computed once per layer (the weights are immutable here:
        :func:`net_weights` rebuilds a ``NetWeights`` when a parameter changes)."""
        cache = self.__dict__.setdefault("_head_factor_cache", {})
        if layer not in cache:
            cache[layer] = self.mlp_in_head_factors(layer)
        return cache[layer]

    def mlp_in_shared(self, layer: int, resid: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows d_mlp"]:
        """``(c(r) * w) @ W_in`` of unpatched rows ``r``."""
        centred = resid - resid.mean(-1, keepdim=True)
        w = self.ln2[layer][0]
        if w is not None:
            centred = centred * w
        return self.linear(centred, self.W_in[layer], None)

    def mlp_in_bias(self, layer: int) -> Tensor:
        b = self.ln2[layer][1]
        return self.b_in[layer] if b is None else self.b_in[layer] + b @ self.W_in[layer]

    def add_mlp_low_rank_(
        self,
        layer: int,
        x: Float[Tensor, "k rows d_model"],
        shared: Float[Tensor, "rows d_mlp"],
        low_rank: Float[Tensor, "k rows d_mlp"],
    ) -> Tensor:
        """``x + mlp(x)`` (into ``x``) given ``(c(x) * w) @ W_in = shared + low_rank``."""
        var, _ = torch.var_mean(x, -1, unbiased=False, keepdim=True)
        inv_scale = torch.rsqrt(var + self.eps)
        bias = self.mlp_in_bias(layer)
        # ``shared`` is per row, common to every patch
        for ps, rs in patch_row_tiles(x.shape[0], x.shape[1], x.device):
            pre = low_rank[ps, rs].add_(shared[rs]).mul_(inv_scale[ps, rs]).add_(bias)
            hidden = self.act(pre).reshape(-1, pre.shape[-1])
            out = x[ps, rs]
            out += torch.addmm(self.b_out[layer], hidden, self.W_out[layer]).view_as(out)
        return x

    def add_attn_out_(self, layer: int, resid: Tensor, z: Float[Tensor, "... hd"]) -> Tensor:
        """``resid + attn_out(z)``, written into ``resid`` (a fresh, owned tensor)."""
        flat = resid.view(-1, self.d_model)
        flat.addmm_(z.reshape(-1, self.hd), self.W_O_flat[layer]).add_(self.b_O[layer])
        return resid

    def attn_out_from_z(self, layer: int, z: Float[Tensor, "... hd"]) -> Tensor:
        return self.linear(z, self.W_O_flat[layer], self.b_O[layer])

    def attention(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, return_pattern: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Causal attention of ``[batch, pos, n_heads, d_head]`` tensors -> ``z`` (same layout).

        With ``return_pattern`` the pattern ``[batch, n_heads, dest, src]`` is computed explicitly
        (and returned); otherwise the fused kernel is used.
        """
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
        scale = self.attn_scales[layer]
        if return_pattern:
            pattern = causal_pattern(qh, kh, scale)
            return (pattern @ vh).transpose(1, 2), pattern
        z = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        return z.transpose(1, 2), None

    def split_qkv(self, qkv: Float[Tensor, "... three_hd"]) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` as ``[..., n_heads, d_head]`` views of a fused projection."""
        shape = (*qkv.shape[:-1], 3, self.n_heads, self.d_head)
        parts = qkv.view(shape).unbind(-3)
        return parts[0], parts[1], parts[2]

    def answer_logits(
        self, final_resid: Float[Tensor, "*k batch d_model"], io_ids: Tensor, s_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """IO and S logits of each row: ln_final, then only the two unembedding columns."""
        x = self.ln(final_resid, self.ln_final)
        io = (x * self.W_U[:, io_ids].T).sum(-1) + self.b_U[io_ids]
        s = (x * self.W_U[:, s_ids].T).sum(-1) + self.b_U[s_ids]
        return io, s

    def logits(self, final_resid: Float[Tensor, "... d_model"]) -> Tensor:
        return self.linear(self.ln(final_resid, self.ln_final), self.W_U, self.b_U)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_bridge(cls, model, device: torch.device | str | None = None) -> "NetWeights":
        reason = unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(f"fast activation patching does not support this model: {reason}")
        cfg = model.cfg
        device = torch.device(device) if device is not None else torch.device(cfg.device)
        dtype = torch.float32

        def get(t: Tensor) -> Tensor:
            return t.detach().to(device=device, dtype=dtype)

        n_layers, n_heads, d_head, d_model = cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model
        hd = n_heads * d_head

        def heads_in(W: Tensor) -> Tensor:  # [L, H, D, dh] -> [L, D, H*dh]
            return W.permute(0, 2, 1, 3).reshape(n_layers, d_model, hd)

        W_qkv = torch.cat([heads_in(get(model.W_Q)), heads_in(get(model.W_K)), heads_in(get(model.W_V))], -1)
        b_qkv = torch.cat(
            [get(model.b_Q).reshape(n_layers, hd), get(model.b_K).reshape(n_layers, hd),
             get(model.b_V).reshape(n_layers, hd)], -1
        )
        attn_only = bool(getattr(cfg, "attn_only", False))
        scales = []
        for layer in range(n_layers):
            scale = 1.0 / math.sqrt(d_head)
            if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
                scale /= float(layer + 1)
            scales.append(scale)
        ln_params = lambda module: tuple(None if t is None else get(t) for t in _ln_params(module))  # noqa: E731
        return cls(
            n_layers=n_layers,
            n_heads=n_heads,
            d_head=d_head,
            d_model=d_model,
            eps=float(cfg.eps),
            act_fn=cfg.act_fn,
            attn_only=attn_only,
            attn_scales=scales,
            W_E=get(model.W_E),
            W_pos=get(model.W_pos),
            W_qkv=W_qkv.contiguous(),
            b_qkv=b_qkv.contiguous(),
            W_O=get(model.W_O).contiguous(),
            b_O=get(model.b_O),
            W_in=None if attn_only else get(model.W_in).contiguous(),
            b_in=None if attn_only else get(model.b_in),
            W_out=None if attn_only else get(model.W_out).contiguous(),
            b_out=None if attn_only else get(model.b_out),
            ln1=[ln_params(model.blocks[layer].ln1) for layer in range(n_layers)],
            ln2=[ln_params(model.blocks[layer].ln2) if not attn_only else (None, None)
                 for layer in range(n_layers)],
            ln_final=ln_params(model.ln_final),
            W_U=get(model.W_U),
            b_U=get(model.b_U),
        )


_WEIGHT_CACHE: "weakref.WeakKeyDictionary[object, tuple[tuple, str, NetWeights]]" = weakref.WeakKeyDictionary()


def _fingerprint(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def net_weights(model, device: torch.device | str | None = None) -> NetWeights:
    """:meth:`NetWeights.from_bridge`, cached per (model, device) until a parameter changes."""
    device = torch.device(device) if device is not None else torch.device(model.cfg.device)
    fingerprint = _fingerprint(model)
    try:
        cached = _WEIGHT_CACHE.get(model)
    except TypeError:  # unhashable / not weak-referenceable
        return NetWeights.from_bridge(model, device)
    if cached is not None and cached[0] == fingerprint and cached[1] == str(device):
        return cached[2]
    weights = NetWeights.from_bridge(model, device)
    try:
        _WEIGHT_CACHE[model] = (fingerprint, str(device), weights)
    except TypeError:
        pass
    return weights


def causal_pattern(
    q: Float[Tensor, "*b head dest d_head"], k: Float[Tensor, "*b head src d_head"], scale: float
) -> Float[Tensor, "*b head dest src"]:
    """Softmax of causally masked ``q . k * scale`` (dest attends to src <= dest)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    n_dest, n_src = scores.shape[-2:]
    mask = torch.ones(n_dest, n_src, dtype=torch.bool, device=scores.device).triu(1 + n_src - n_dest)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


# ----------------------------------------------------------------------------------------------
# The corrupted run
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CorruptedRun:
    """Activations of one unpatched forward on the corrupted tokens (all prompts, all positions).

    ``resid[l]`` is ``resid_pre`` of layer ``l`` (``resid[n_layers]`` is the final residual
    stream, the input of ``ln_final``); ``resid_mid[l]``, ``qkv[l]`` (fused projections after bias)
    and, when kept, ``z[l]``.
    """

    resid: list[Float[Tensor, "batch pos d_model"]]
    resid_mid: list[Float[Tensor, "batch pos d_model"]]
    qkv: list[Float[Tensor, "batch pos three_hd"]]
    z: list[Float[Tensor, "batch pos n_heads d_head"]] | None

    @classmethod
    def run(cls, net: NetWeights, tokens: Int[Tensor, "batch pos"], keep_z: bool = True) -> "CorruptedRun":
        n_pos = tokens.shape[1]
        resid = net.W_E[tokens] + net.W_pos[:n_pos]
        resids, mids, qkvs, zs = [], [], [], []
        for layer in range(net.n_layers):
            resids.append(resid)
            qkv = net.linear(net.ln(resid, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])
            qkvs.append(qkv)
            z, _ = net.attention(layer, *net.split_qkv(qkv))
            if keep_z:
                zs.append(z)
            resid = resid + net.attn_out_from_z(layer, z.reshape(*z.shape[:2], net.hd))
            mids.append(resid)
            if not net.attn_only:
                resid = resid + net.mlp(layer, resid)
        resids.append(resid)
        return cls(resid=resids, resid_mid=mids, qkv=qkvs, z=zs if keep_z else None)

    @property
    def final(self) -> Tensor:
        return self.resid[-1]


# ----------------------------------------------------------------------------------------------
# Rows a group of patches can change
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RowSet:
    """For each prompt ``n`` the positions ``start[n] .. stop[n]`` (inclusive) to recompute.

    ``start[n] > stop[n]`` means the patch cannot change prompt ``n``'s metric (its value is the
    corrupted run's). ``rows`` indexes the flattened ``[batch * pos]`` layout; ``end_rows`` (when
    ``stop`` is each prompt's END) gives, for every prompt with rows, the index within ``rows`` of
    its last row; ``active`` marks those prompts; ``other_rows`` indexes every row not recomputed
    (its keys and values come from the corrupted run).
    """

    start: Int[Tensor, "batch"]
    stop: Int[Tensor, "batch"]
    n_pos: int
    rows: Int[Tensor, "n_rows"]
    end_rows: Int[Tensor, "n_active"]
    active: Tensor
    other_rows: Int[Tensor, "n_other"]
    recomputed: Bool[Tensor, "batch pos"]

    @classmethod
    def build(cls, start: Tensor, stop: Tensor, n_pos: int) -> "RowSet":
        start = start.long()
        stop = stop.long()
        lengths = (stop - start + 1).clamp(min=0)
        active = lengths > 0
        device = start.device
        total = int(lengths.sum())
        prompt = torch.repeat_interleave(torch.arange(len(start), device=device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(total, device=device) - offsets[prompt]
        rows = prompt * n_pos + start[prompt] + within
        end_rows = (offsets + lengths - 1)[active]
        recomputed = torch.zeros(len(start) * n_pos, dtype=torch.bool, device=device)
        recomputed[rows] = True
        other_rows = (~recomputed).nonzero()[:, 0]
        return cls(start=start, stop=stop, n_pos=n_pos, rows=rows, end_rows=end_rows, active=active,
                   other_rows=other_rows, recomputed=recomputed.view(len(start), n_pos))

    @property
    def n_rows(self) -> int:
        return int(self.rows.numel())

    @property
    def covers_everything(self) -> bool:
        return self.n_rows == len(self.start) * self.n_pos

    def gather(self, full: Float[Tensor, "batch pos *rest"]) -> Float[Tensor, "n_rows *rest"]:
        """The rows of a ``[batch, pos, ...]`` tensor."""
        return full.reshape(full.shape[0] * full.shape[1], *full.shape[2:]).index_select(0, self.rows)


# ----------------------------------------------------------------------------------------------
# The batched resume forward
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    """``k`` patched residual streams joining the forward at (layer, stage).

    ``make_rows()`` returns them at the group's rows, ``[k, n_rows, d_model]``; ``layer`` may be
    ``n_layers`` (with stage ``"pre"``) for a stream that is already final.
    """

    layer: int
    stage: str
    k: int
    make_rows: Callable[[], Tensor]
    tag: object = None

    @property
    def order(self) -> tuple[int, int]:
        return (self.layer, _STAGE_ORDER[self.stage])


def normalise_entry(entry: Entry, n_layers: int) -> Entry:
    """(l, "post") is (l + 1, "pre")."""
    if entry.stage == "post":
        return dataclasses.replace(entry, layer=entry.layer + 1, stage="pre")
    return entry


# Recomputed rows attend through :meth:`ResumeForward._window_attention` (queries of the changed
# rows only, the unchanged keys shared by every patch); False: the full layout of every patch
# (every row's query, the unchanged rows copied per patch), kept as the reference in tests.
WINDOW_ATTENTION = True


class ResumeForward:
    """Resume the corrupted forward with batches of patched residual streams (see module doc)."""

    def __init__(self, net: NetWeights, corrupted: CorruptedRun, rowset: RowSet, *, end_only: bool):
        self.net = net
        self.corrupted = corrupted
        self.rowset = rowset
        self.end_only = end_only
        self.n_batch, self.n_pos = corrupted.final.shape[:2]
        self._other_rows: dict[tuple, Tensor] = {}
        self._end_kv: tuple[Tensor, Tensor] | None = None

    def _full_layout(self, layer: int, rows_values: Tensor, part: slice) -> Tensor:
        """``[k, batch * pos, c]``: the recomputed rows' values, the corrupted run's elsewhere
        (``part`` selects the q|k|v columns of the cached projections)."""
        rs = self.rowset
        k, _, width = rows_values.shape
        if rs.covers_everything:
            return rows_values
        key = (layer, part.start, part.stop)
        other = self._other_rows.get(key)
        if other is None:
            flat = self.corrupted.qkv[layer].reshape(self.n_batch * self.n_pos, -1)[:, part]
            other = self._other_rows[key] = flat.index_select(0, rs.other_rows)
        full = torch.empty(k, self.n_batch * self.n_pos, width, dtype=rows_values.dtype, device=rows_values.device)
        full.index_copy_(1, rs.rows, rows_values)
        full.index_copy_(1, rs.other_rows, other.expand(k, -1, -1))
        return full

    def _window_layout(self) -> tuple[Tensor, Tensor, int, Tensor]:
        """The rowset as padded windows: (active prompts ``[a]``, each row's index in the padded
        ``[a * width]`` layout ``[rows]``, ``width``, each active prompt's window start ``[a]``)."""
        if getattr(self, "_windows", None) is None:
            rs = self.rowset
            active = rs.active.nonzero()[:, 0]
            lengths = (rs.stop - rs.start + 1).clamp(min=0)[active]
            width = int(lengths.max())
            prompt = torch.repeat_interleave(torch.arange(len(active), device=active.device), lengths)
            offsets = torch.cumsum(lengths, 0) - lengths
            within = torch.arange(len(prompt), device=active.device) - offsets[prompt]
            self._windows = (active, prompt * width + within, width, rs.start[active])
        return self._windows

    def _window_attention(self, layer: int, qkv: Tensor) -> Tensor:
        """``z [k, rows, hd]`` of the recomputed rows: each window's queries attend to the corrupted
        run's keys/values before the window (cached, shared by the ``k`` patches) and causally to
        the window's own recomputed keys/values (the attention of the full layout, for the rows
        that changed only; one softmax over both parts)."""
        net = self.net
        H, dh, hd = net.n_heads, net.d_head, net.hd
        k = qkv.shape[0]
        active, pad_index, width, start = self._window_layout()
        a = len(active)
        padded = qkv.new_zeros(k, a * width, 3 * hd)
        padded.index_copy_(1, pad_index, qkv)
        q, kw, vw = (t.view(k, a, width, H, dh).permute(0, 1, 3, 2, 4)
                     for t in padded.view(k, a, width, 3, hd).unbind(3))  # [k, a, H, width, dh]
        cached = self.corrupted.qkv[layer].index_select(0, active).view(a, self.n_pos, 3, H, dh)
        k_pre = cached[:, :, 1].permute(0, 2, 3, 1)  # [a, H, dh, pos]
        v_pre = cached[:, :, 2].permute(0, 2, 1, 3)  # [a, H, pos, dh]
        scale = net.attn_scales[layer]
        positions = torch.arange(self.n_pos, device=qkv.device)
        pre_ok = positions[None, :] < start[:, None]  # [a, pos]
        steps = torch.arange(width, device=qkv.device)
        win_ok = steps[None, :] <= steps[:, None]  # [query, key]
        s_pre = torch.matmul(q, k_pre).mul_(scale).masked_fill_(~pre_ok[None, :, None, None, :], float("-inf"))
        s_win = torch.matmul(q, kw.transpose(-1, -2)).mul_(scale).masked_fill_(~win_ok, float("-inf"))
        pattern = torch.cat([s_pre, s_win], -1).softmax(-1)
        z = torch.matmul(pattern[..., : self.n_pos], v_pre) + torch.matmul(pattern[..., self.n_pos:], vw)
        z = z.permute(0, 1, 3, 2, 4).reshape(k, a * width, hd)  # [k, a * width, hd]
        return z.index_select(1, pad_index)

    def _attention_block(self, layer: int, resid: Tensor) -> Tensor:
        """``resid`` [k, rows, d] -> ``resid_mid`` at the same rows."""
        net = self.net
        k = resid.shape[0]
        qkv = net.linear(net.ln(resid, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])
        if WINDOW_ATTENTION and not self.rowset.covers_everything:
            return net.add_attn_out_(layer, resid, self._window_attention(layer, qkv))
        full = self._full_layout(layer, qkv, slice(0, 3 * net.hd))
        full = full.view(k * self.n_batch, self.n_pos, 3 * net.hd)
        z, _ = net.attention(layer, *net.split_qkv(full))
        z = z.reshape(k, self.n_batch * self.n_pos, net.hd)
        if not self.rowset.covers_everything:
            z = z.index_select(1, self.rowset.rows)
        return net.add_attn_out_(layer, resid, z)

    def _attention_block_end(self, layer: int, resid: Tensor) -> Tensor:
        """Last layer for a LogitDiff: the attention output at END rows only.

        With one query per prompt, keys and values of recomputed rows are never materialised:
        ``q . (x W_K + b_K) = x . (W_K q) + q . b_K`` and ``sum_j p_j (x_j W_V + b_V) =
        (sum_j p_j x_j) W_V + (sum_j p_j) b_V`` (x = ln1 output), which costs d_model per row and
        head instead of a d_model x 2 d_model projection per row. Rows that are not recomputed use
        the corrupted run's keys and values.
        """
        net = self.net
        rs = self.rowset
        k = resid.shape[0]
        n_heads, d_head, d_model = net.n_heads, net.d_head, net.d_model
        active = rs.active
        x = net.ln(resid, net.ln1[layer])  # [k, rows, d_model]
        q = net.linear(x[:, rs.end_rows], net.W_q[layer], net.b_q[layer]).view(k, -1, n_heads, d_head)
        x_full = x.new_zeros(k, self.n_batch * self.n_pos, d_model)
        x_full.index_copy_(1, rs.rows, x)
        x_full = x_full.view(k, self.n_batch, self.n_pos, d_model)[:, active]  # [k, a, pos, d_model]
        W_K, W_V = net.W_K_heads[layer], net.W_V_heads[layer]  # [head, d_model, d_head]
        b_K, b_V = net.b_K_heads[layer], net.b_V_heads[layer]  # [head, d_head]
        u = torch.einsum("kahd,hmd->kahm", q, W_K)
        scores_new = torch.einsum("kapm,kahm->kahp", x_full, u) + (q * b_K).sum(-1)[..., None]
        if self._end_kv is None:
            _, cached_k, cached_v = net.split_qkv(self.corrupted.qkv[layer][active])
            self._end_kv = (cached_k, cached_v)
        cached_k, cached_v = self._end_kv  # [a, pos, head, d_head]
        scores_old = torch.einsum("kahd,aphd->kahp", q, cached_k)
        new = rs.recomputed[active][None, :, None, :]  # [1, a, 1, pos]
        scores = torch.where(new, scores_new, scores_old) * net.attn_scales[layer]
        positions = torch.arange(self.n_pos, device=scores.device)
        masked = positions[None, :] > rs.stop[active][:, None]  # [a, pos]
        pattern = scores.masked_fill(masked[None, :, None, :], float("-inf")).softmax(-1)
        p_new = pattern * new
        p_old = pattern - p_new
        z = (
            torch.einsum("kahm,hmd->kahd", torch.einsum("kahp,kapm->kahm", p_new, x_full), W_V)
            + p_new.sum(-1)[..., None] * b_V
            + torch.einsum("kahp,aphd->kahd", p_old, cached_v)
        )
        return resid[:, rs.end_rows] + net.attn_out_from_z(layer, z.reshape(k, -1, net.hd))

    def run(self, entries: Sequence[Entry]) -> Tensor:
        """Final residual streams of all entries, in entry order.

        Returns ``[K, n_active, d_model]`` (END rows of active prompts) when ``end_only``, else
        ``[K, n_rows, d_model]``.
        """
        net = self.net
        entries = sorted((normalise_entry(e, net.n_layers) for e in entries), key=lambda e: e.order)
        pending = list(entries)
        resid: Tensor | None = None
        trimmed = False  # resid holds END rows only

        def join(layer: int, stage: str) -> None:
            nonlocal resid
            while pending and pending[0].layer == layer and pending[0].stage == stage:
                entry = pending.pop(0)
                rows = entry.make_rows()
                if trimmed:
                    rows = rows[:, self.rowset.end_rows]
                resid = rows if resid is None else torch.cat([resid, rows], 0)

        first_layer = entries[0].layer if entries else net.n_layers
        for layer in range(first_layer, net.n_layers):
            join(layer, "pre")
            if resid is not None:
                if self.end_only and layer == net.n_layers - 1:
                    resid = self._attention_block_end(layer, resid)
                    trimmed = True
                else:
                    resid = self._attention_block(layer, resid)
            join(layer, "mid")
            if resid is not None:
                resid = net.add_mlp_(layer, resid)
        join(net.n_layers, "pre")
        assert not pending and resid is not None
        if self.end_only and not trimmed:
            resid = resid[:, self.rowset.end_rows]
        return resid
