"""Path patching (Wang et al. 2022, Appendix B, Algorithm 1): exact and fast.

Semantics (the seed notebook's ``get_path_patch_head_to_final_resid_post`` and
``get_path_patch_head_to_heads``, extended with the paper code's position restriction):

* **Senders -> logits** (:func:`path_patch_to_logits`). For each sender, run ``x_orig`` with every
  head's output (``hook_z``) frozen to its ``x_orig`` value except the sender, whose output comes
  from ``x_new`` (only at ``sender_positions`` when given, as the paper code's ``positions``
  argument); MLPs and LayerNorms are recomputed; the metric is read from the resulting logits. An
  MLP sender patches its ``hook_mlp_out`` from ``x_new`` with all heads frozen and later MLPs
  recomputed.
* **Senders -> head inputs** (:func:`path_patch_to_heads`). Step 2: the same frozen run, recording
  the receivers' ``q``/``k``/``v``. Step 3: a normal ``x_orig`` run whose receivers' ``q``/``k``/``v``
  are replaced by the recorded ones (only at ``receiver_positions`` when given); everything
  downstream is recomputed and the metric is read from the logits. Senders that cannot reach any
  receiver (layer >= the last receiver layer) get NaN.

The paper code freezes every head's ``q``/``k``/``v`` and patches ``hook_result`` at the sender
positions; with all attention inputs frozen, each head's ``z`` is frozen, and patching ``result``
(= ``z @ W_O``) at a position is the same as patching ``z`` there, so freezing ``z`` is exact.

Why the fast path is exact
--------------------------
With every head's output frozen, attention no longer mixes positions: the residual stream at
position ``p`` of the patched run is its ``x_orig`` value plus the sender's change at ``p`` (zero
outside the sender positions) carried through the position-wise MLPs and LayerNorms. So

* senders -> logits only needs the MLPs from the sender's layer on, at the rows the metric reads
  (each prompt's END row for an :class:`ioi.metrics.LogitDiff`) -- one row per prompt instead of a
  whole forward pass, and two unembedding columns instead of the vocabulary;
* step 2 of senders -> heads only needs the rows where the receivers are patched (``receiver
  positions`` intersected with ``sender positions``);
* step 3 changes nothing before the first patched receiver position of each prompt (causal
  attention), so it resumes at the first receiver layer on a per-prompt window of positions
  ``[first changed, last read]``, attending to the cached ``x_orig`` keys/values before the window.
  In that first layer only the receivers' attention changes: it is recomputed for the receiver
  heads alone, ``resid_mid`` is ``x_orig``'s plus ``dz @ W_O`` of the receivers, and the MLP sees a
  rank-``d_head`` change per receiver (its input projection is ``d_head`` deep). For a LogitDiff
  the last layer is needed at END only and never projects the window's keys/values
  (``q . (x W_K) = x . (W_K q)``). The rows the window recomputes are genuinely changed (every
  query after the first patched receiver position reads it), so step 3 is most of the FLOPs: for
  Fig. 13b (S1+1 -> induction keys) ~13 positions x 7 layers x 72 senders per prompt
  (benchmarks/path_floor.py counts it).

Many senders share one batched pass (``k`` senders x ``N`` prompts), chunked to a memory budget.
The two runs on ``x_orig`` and ``x_new`` use a plain-tensor forward on the bridge's processed
weights (no unembedding; reusable across sweeps via :func:`prepare_path_patching`). With a
:class:`ioi.metrics.LogitDiff` they compute only each prompt's positions up to END, packed into one
row list (no right padding), and for senders -> logits the last layer past its keys/values at END
alone. On a CPU, MLPs run in row tiles that keep their hidden activations in cache. The results
equal the hook-based reference (:mod:`ioi.patching.reference`, the seed's loops on the bridge) to
float32 rounding (tests: <= 1e-4 absolute; measured ~1e-7 on GPT-2 small's shape).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm

from ioi.patching._fast_forward import _ACTIVATIONS, NetWeights, net_weights, patch_row_tiles
from ioi.validation import check_tokens

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "Head",
    "PathPatchCache",
    "PathPatchResult",
    "Positions",
    "path_patch_to_heads",
    "path_patch_to_logits",
    "positions_as_list",
    "positions_mask",
    "prepare_path_patching",
]

Head = tuple[int, int]
Positions = Union[None, int, Tensor, Sequence[Union[int, Tensor]], Mapping[str, Union[int, Tensor]]]
SenderKind = Literal["heads", "mlps", "both"]
ReceiverInput = Literal["q", "k", "v"]

DEFAULT_MEMORY_BUDGET_MB = {"cpu": 1024, "cuda": 4096}
_BYTES = 4


@dataclasses.dataclass
class PathPatchResult:
    """Effects of head senders ``[n_layers, n_heads, ...]`` and MLP senders ``[n_layers, ...]``."""

    heads: Tensor
    mlps: Tensor

    def __iter__(self):
        return iter((self.heads, self.mlps))


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------


def positions_as_list(positions: Positions, n_prompts: int, device=None) -> list[Tensor] | None:
    """Normalise a positions argument to a list of per-prompt position tensors ``LongTensor[N]``.

    ``None`` -> ``None`` (all positions). Accepted: an int (the same position for every prompt), a
    ``LongTensor[N]`` (one position per prompt, e.g. ``word_idx["END"]``), a ``LongTensor[k, N]``,
    a list/tuple of ints or ``LongTensor[N]``, or a mapping ``label -> LongTensor[N]`` (e.g.
    ``{"S2": ..., "END": ...}``). A 1-D tensor is always read as *per-prompt* positions.
    """
    if positions is None:
        return None
    if isinstance(positions, Mapping):
        items = list(positions.values())
    elif isinstance(positions, Tensor):
        if positions.dtype == torch.bool:
            raise ValueError("A boolean positions mask has no list form; use positions_mask().")
        if positions.ndim == 0:
            items = [positions]
        elif positions.ndim == 1:
            items = [positions]
        elif positions.ndim == 2:
            items = list(positions)
        else:
            raise ValueError(f"positions tensor must be 0-, 1- or 2-D, got {tuple(positions.shape)}")
    elif isinstance(positions, int):
        items = [positions]
    else:
        items = list(positions)
    out = []
    for item in items:
        t = torch.as_tensor(item, device=device).long()
        if t.ndim == 0:
            t = t.expand(n_prompts)
        if t.shape != (n_prompts,):
            raise ValueError(
                f"Each positions entry must give one position per prompt ({n_prompts}); got shape "
                f"{tuple(t.shape)}."
            )
        out.append(t.to(device) if device is not None else t)
    if not out:
        raise ValueError("Empty positions: pass None for all positions, or at least one entry.")
    return out


def positions_mask(
    positions: Positions, n_prompts: int, seq: int, device=None
) -> Bool[Tensor, "batch seq"]:
    """Boolean ``[N, seq]`` mask of the (prompt, position) pairs selected by ``positions``.

    Accepts everything :func:`positions_as_list` does, plus a boolean ``[N, seq]`` mask as is.
    Built with ``mask[arange(N), pos] = True`` per entry (prompt ``n`` selects its own position).
    """
    if positions is None:
        return torch.ones(n_prompts, seq, dtype=torch.bool, device=device)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (n_prompts, seq):
            raise ValueError(
                f"A boolean positions mask must have shape ({n_prompts}, {seq}); got "
                f"{tuple(positions.shape)}."
            )
        return positions.to(device)
    mask = torch.zeros(n_prompts, seq, dtype=torch.bool, device=device)
    rows = torch.arange(n_prompts, device=device)
    for pos in positions_as_list(positions, n_prompts, device):
        if int(pos.min()) < 0 or int(pos.max()) >= seq:
            raise ValueError(
                f"positions must lie in [0, {seq}); got [{int(pos.min())}, {int(pos.max())}]."
            )
        mask[rows, pos] = True
    return mask


# ----------------------------------------------------------------------------------------------
# The model's weights as plain tensors
# ----------------------------------------------------------------------------------------------

def _check_supported(model) -> None:
    cfg = model.cfg
    problems = []
    if getattr(cfg, "act_fn", None) not in _ACTIVATIONS:
        problems.append(f"activation {getattr(cfg, 'act_fn', None)!r}")
    if getattr(cfg, "normalization_type", "LN") not in ("LN", "LNPre"):
        problems.append(f"normalization {getattr(cfg, 'normalization_type', None)!r}")
    if getattr(cfg, "parallel_attn_mlp", False):
        problems.append("parallel attention/MLP")
    if getattr(cfg, "positional_embedding_type", "standard") != "standard":
        problems.append("non-standard positional embeddings")
    if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads):
        problems.append("grouped-query attention")
    if getattr(cfg, "gated_mlp", False):
        problems.append("gated MLP")
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    if hf_cfg is not None and getattr(hf_cfg, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx")
    if problems:
        raise NotImplementedError(
            "The fast path-patching implementation reproduces GPT-2-style models only; this model "
            f"has: {', '.join(problems)}. Use ioi.patching.reference instead."
        )


@dataclasses.dataclass
class _Net:
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    eps: float
    scale: float
    act: Callable[[Tensor], Tensor]
    W_Q: Tensor  # [L, H, D, dh]
    W_K: Tensor
    W_V: Tensor
    b_Q: Tensor  # [L, H, dh]
    b_K: Tensor
    b_V: Tensor
    W_qkv: Tensor  # [L, D, 3*H*dh]
    b_qkv: Tensor  # [L, 3*H*dh]
    W_O: Tensor  # [L, H, dh, D]
    W_O_flat: Tensor  # [L, H*dh, D]
    b_O: Tensor  # [L, D]
    W_in: Tensor | None
    b_in: Tensor | None
    W_out: Tensor | None
    b_out: Tensor | None
    ln1: list
    ln2: list
    ln_final: tuple
    W_U: Tensor
    b_U: Tensor
    W_E: Tensor
    W_pos: Tensor
    weights: NetWeights  # the shared engine's weights, whose methods this reuses

    @classmethod
    def from_model(cls, model) -> "_Net":
        """The model's weights, taken from the activation engine's per-model cache
        (:func:`ioi.patching._fast_forward.net_weights`, float32 on the model's device), plus the
        per-head ``q``/``k``/``v`` views path patching reads its receivers through."""
        _check_supported(model)
        cfg = model.cfg
        w = net_weights(model, model.W_U.device)
        L, H, dh, D = w.n_layers, w.n_heads, w.d_head, w.d_model
        scale = getattr(cfg, "attn_scale", -1.0)
        if not scale or scale <= 0:
            scale = math.sqrt(dh) if getattr(cfg, "use_attn_scale", True) else 1.0
        return cls(
            n_layers=L,
            n_heads=H,
            d_head=dh,
            d_model=D,
            eps=w.eps,
            scale=float(scale),
            act=_ACTIVATIONS[w.act_fn],
            W_Q=w.W_q.reshape(L, D, H, dh).permute(0, 2, 1, 3),
            W_K=w.W_K_heads,
            W_V=w.W_V_heads,
            b_Q=w.b_q.reshape(L, H, dh),
            b_K=w.b_K_heads,
            b_V=w.b_V_heads,
            W_qkv=w.W_qkv,
            b_qkv=w.b_qkv,
            W_O=w.W_O,
            W_O_flat=w.W_O_flat,
            b_O=w.b_O,
            W_in=w.W_in,
            b_in=w.b_in,
            W_out=w.W_out,
            b_out=w.b_out,
            ln1=w.ln1,
            ln2=[] if w.attn_only else w.ln2,
            ln_final=w.ln_final,
            W_U=w.W_U,
            b_U=w.b_U,
            W_E=w.W_E,
            W_pos=w.W_pos,
            weights=w,
        )

    @property
    def has_mlps(self) -> bool:
        return self.W_in is not None

    def ln(self, x: Tensor, params) -> Tensor:
        return self.weights.ln(x, params)

    def _linear(self, x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        return self.weights.linear(x, W, b)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """MLP output of ``layer`` for residual rows ``x`` (``resid_mid``), any leading shape (the
        shared engine's :meth:`~ioi.patching._fast_forward.NetWeights.mlp`: row tiles on a CPU)."""
        return self.weights.mlp(layer, x)

    def head_input(self, layer: int, head: int, which: str, x_normed: Tensor) -> Tensor:
        """``q``/``k``/``v`` of one head from LayerNorm-ed residual rows ``[..., D]`` -> ``[..., dh]``."""
        W = {"q": self.W_Q, "k": self.W_K, "v": self.W_V}[which][layer, head]
        b = {"q": self.b_Q, "k": self.b_K, "v": self.b_V}[which][layer, head]
        return self._linear(x_normed, W, b)

    def answer_logits(self, resid: Tensor, token_ids: Tensor) -> Tensor:
        """Logits of ``token_ids[n]`` for final residual rows ``resid [k, N, D]`` -> ``[k, N]``."""
        h = self.ln(resid, self.ln_final)
        cols = self.W_U[:, token_ids]  # [D, N]
        return torch.einsum("knd,dn->kn", h, cols) + self.b_U[token_ids]

    def logits(self, resid: Tensor) -> Tensor:
        return self.weights.logits(resid)


# ----------------------------------------------------------------------------------------------
# Caches of the orig and new runs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Cache:
    acts: dict[str, Tensor]
    logits: Tensor | None

    def __getitem__(self, name: str) -> Tensor:
        return self.acts[name]


@torch.no_grad()
def _forward_cache(
    net: _Net,
    toks: Tensor,
    names: set[str],
    knockout=None,
    n_layers: int | None = None,
    last: Tensor | None = None,
    last_layer_last_row_only: bool = False,
    replace: Mapping[int, Sequence[tuple[int, str, Tensor, Tensor]]] | None = None,
) -> _Cache:
    """One plain forward pass over ``toks``, keeping the activations named in ``names``.

    ``replace[l]``: ``(head, "q"|"k"|"v", mask [N, S], values [N, S, d_head])``: that head's input
    is replaced where ``mask`` (path patching's step 3 on whole prompts). ``.attn.hook_pattern``
    is kept as ``[N, H, S, S]`` (query rows after ``last[n]`` are not meaningful).

    Hook names as TransformerLens/the bridge use them (``blocks.{l}.hook_resid_pre``,
    ``.hook_resid_mid``, ``.hook_mlp_out``, ``.hook_resid_post``, ``.attn.hook_q/k/v/z``), each
    kept as ``[N, seq, ...]``. A ``knockout`` (:class:`ioi.ablation.Ablation`) replaces ``z`` / MLP
    outputs exactly as its hooks do on the bridge. ``n_layers``: stop after that many layers. No
    unembedding (the full logits, needed only by generic metrics, are computed lazily by
    :func:`_orig_logits`).

    ``last [N]``: compute only positions ``0 .. last[n]`` of prompt ``n`` (causal attention: those
    never read later positions), packed into one row list so no compute goes to right padding or
    to positions after the one a metric reads; the kept tensors hold zeros after ``last[n]``.
    ``last_layer_last_row_only``: in the last computed layer only ``k``/``v`` cover every position;
    the query, ``z`` and everything after it are computed (and kept) at row ``last[n]`` only.
    Equal to the bridge's forward up to float32 rounding (tests).
    """
    L = net.n_layers if n_layers is None else n_layers
    N, S = toks.shape
    H, dh = net.n_heads, net.d_head
    device = toks.device
    if last is None:
        last = torch.full((N,), S - 1, dtype=torch.long, device=device)
    last = last.to(device).long()
    valid = torch.arange(S, device=device)[None, :] <= last[:, None]  # [N, S]
    n_idx, p_idx = valid.nonzero(as_tuple=True)  # packed rows, prompt-major
    dense = len(n_idx) == N * S
    last_row = torch.cumsum(last + 1, 0) - 1  # each prompt's row ``last[n]`` in the packed list
    acts: dict[str, Tensor] = {}

    def keep(name: str, value: Tensor, only_last: bool = False) -> None:
        """Store packed rows ``value [T or N, ...]`` as ``[N, S, ...]`` (zeros where not computed)."""
        if name not in names:
            return
        if dense and not only_last:
            acts[name] = value.reshape(N, S, *value.shape[1:])
            return
        out = value.new_zeros(N, S, *value.shape[1:])
        if only_last:
            out[torch.arange(N, device=device), last] = value
        else:
            out[n_idx, p_idx] = value
        acts[name] = out

    def knocked_z(z: Tensor, layer: int, rows_n: Tensor, rows_p: Tensor) -> Tensor:
        if knockout is None or knockout.head_keep is None:
            return z
        keep_mask = knockout.head_keep[rows_n, rows_p, layer]  # [R, H]
        return torch.where(keep_mask[..., None], z, knockout.head_means[rows_n, rows_p, layer])

    def knocked_mlp(out: Tensor, layer: int, rows_n: Tensor, rows_p: Tensor) -> Tensor:
        if knockout is None or knockout.mlp_keep is None:
            return out
        keep_mask = knockout.mlp_keep[rows_n, rows_p, layer]  # [R]
        return torch.where(keep_mask[:, None], out, knockout.mlp_means[rows_n, rows_p, layer])

    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    bias = torch.zeros(S, S, device=device, dtype=net.W_E.dtype).masked_fill(~causal, float("-inf"))
    x = net.W_E[toks[n_idx, p_idx]] + net.W_pos[p_idx]  # [T, D]
    for layer in range(L):
        only_last = last_layer_last_row_only and layer == L - 1
        keep(f"blocks.{layer}.hook_resid_pre", x)
        qkv = net._linear(net.ln(x, net.ln1[layer]), net.W_qkv[layer], net.b_qkv[layer])
        if dense:
            qkv = qkv.reshape(N, S, 3 * H * dh)
        else:
            qkv = qkv.new_zeros(N, S, 3 * H * dh).index_put_((n_idx, p_idx), qkv)
        q, k, v = (t.reshape(N, S, H, dh) for t in qkv.split(H * dh, dim=-1))
        if replace and layer in replace:
            inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
            for head, which, mask, values in replace[layer]:
                t = inputs[which]
                t[:, :, head] = torch.where(mask[..., None], values.to(t.dtype), t[:, :, head])
            q, k, v = inputs["q"], inputs["k"], inputs["v"]
        for kind, value in (("k", k), ("v", v)):
            if f"blocks.{layer}.attn.hook_{kind}" in names:
                keep(f"blocks.{layer}.attn.hook_{kind}", value[n_idx, p_idx])
        if only_last:
            rows_n, rows_p = torch.arange(N, device=device), last
            q = q[rows_n, rows_p]  # [N, H, dh]
            keep(f"blocks.{layer}.attn.hook_q", q, only_last=True)
            scores = torch.einsum("nhe,nkhe->nhk", q, k) / net.scale
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
            z = torch.einsum("nhk,nkhe->nhe", scores.softmax(dim=-1), v)
            x = x[last_row]
        else:
            rows_n, rows_p = n_idx, p_idx
            if f"blocks.{layer}.attn.hook_q" in names:
                keep(f"blocks.{layer}.attn.hook_q", q[n_idx, p_idx])
            scores = torch.einsum("nqhe,nkhe->nhqk", q, k) / net.scale + bias
            pattern = scores.softmax(dim=-1)
            if f"blocks.{layer}.attn.hook_pattern" in names:
                acts[f"blocks.{layer}.attn.hook_pattern"] = pattern
            z = torch.einsum("nhqk,nkhe->nqhe", pattern, v)
            z = z.reshape(N * S, H, dh) if dense else z[n_idx, p_idx]  # [T, H, dh]
        z = knocked_z(z, layer, rows_n, rows_p)
        keep(f"blocks.{layer}.attn.hook_z", z, only_last)
        if layer == L - 1 and not any(
            f"blocks.{layer}.{name}" in names for name in ("hook_resid_mid", "hook_mlp_out", "hook_resid_post")
        ):
            break  # nothing after the last layer's z is kept (e.g. x_new for head senders): no W_O, no MLP
        x = x + net._linear(z.reshape(len(z), H * dh), net.W_O_flat[layer], net.b_O[layer])
        keep(f"blocks.{layer}.hook_resid_mid", x, only_last)
        if net.has_mlps:
            mlp_out = knocked_mlp(net.mlp(layer, x), layer, rows_n, rows_p)
            keep(f"blocks.{layer}.hook_mlp_out", mlp_out, only_last)
            x = x + mlp_out
        keep(f"blocks.{layer}.hook_resid_post", x, only_last)
    return _Cache(acts=acts, logits=None)


@dataclasses.dataclass
class PathPatchCache:
    """The ``x_orig`` and ``x_new`` forward passes, computed once and reused across sweeps.

    Build with :func:`prepare_path_patching`; pass as ``cache=`` to :func:`path_patch_to_logits`
    / :func:`path_patch_to_heads` with the same model, tokens and knockout (checked).
    """

    net: _Net
    model_id: int
    orig_toks: Tensor
    new_toks: Tensor
    knockout: Any
    orig: _Cache
    new: _Cache

    def check(self, model, orig_toks: Tensor, new_toks: Tensor, knockout) -> None:
        if (
            id(model) != self.model_id
            or knockout is not self.knockout
            or not torch.equal(orig_toks, self.orig_toks)
            or not torch.equal(new_toks, self.new_toks)
        ):
            raise ValueError(
                "cache= was prepared for another model, other tokens or another knockout; call "
                "prepare_path_patching again with the same arguments."
            )


def _all_names(n_layers: int) -> set[str]:
    names = {f"blocks.{n_layers - 1}.hook_resid_post"}
    for l in range(n_layers):
        names |= {f"blocks.{l}.hook_{x}" for x in ("resid_pre", "resid_mid", "mlp_out")}
        names |= {f"blocks.{l}.attn.hook_{x}" for x in ("q", "k", "v", "z")}
    return names


@torch.no_grad()
def prepare_path_patching(
    model, orig_toks: Int[Tensor, "batch seq"], new_toks: Int[Tensor, "batch seq"], *, knockout=None
) -> PathPatchCache:
    """Run ``x_orig`` and ``x_new`` once (with ``knockout``), keeping what any sweep needs."""
    orig_toks, new_toks = _check_inputs(model, orig_toks, new_toks, knockout)
    net = _Net.from_model(model)
    L = net.n_layers
    new_names = {f"blocks.{l}.attn.hook_z" for l in range(L)} | {f"blocks.{l}.hook_mlp_out" for l in range(L)}
    return PathPatchCache(
        net=net,
        model_id=id(model),
        orig_toks=orig_toks,
        new_toks=new_toks,
        knockout=knockout,
        orig=_forward_cache(net, orig_toks, _all_names(L), knockout),
        new=_forward_cache(net, new_toks, new_names, knockout),
    )


def _orig_logits(net: _Net, oc: _Cache) -> Tensor:
    if oc.logits is None:
        oc.logits = net.logits(oc[f"blocks.{net.n_layers - 1}.hook_resid_post"])
    return oc.logits


def _check_inputs(model, orig_toks: Tensor, new_toks: Tensor, knockout) -> tuple[Tensor, Tensor]:
    orig_toks = check_tokens(model, orig_toks, "orig_toks")
    new_toks = check_tokens(model, new_toks, "new_toks")
    if orig_toks.ndim != 2 or orig_toks.shape != new_toks.shape:
        raise ValueError(
            "orig_toks and new_toks must be [batch, seq] token tensors of the same shape "
            f"(position-aligned prompts); got {tuple(orig_toks.shape)} and {tuple(new_toks.shape)}."
        )
    if knockout is not None:
        knockout.check_shape(orig_toks.shape[0], orig_toks.shape[1])
    return orig_toks, new_toks


def _is_logit_diff(metric) -> bool:
    return all(hasattr(metric, a) for a in ("end_idx", "io_ids", "s_ids", "from_answer_logits"))


def _budget_bytes(memory_budget_mb: float | None, device: torch.device) -> float:
    if memory_budget_mb is None:
        memory_budget_mb = DEFAULT_MEMORY_BUDGET_MB.get(device.type, 1024)
    return float(memory_budget_mb) * 2**20


def _chunk_size(per_sender_bytes: float, budget: float, n: int, max_per_batch: int | None) -> int:
    k = max(1, int(budget // max(per_sender_bytes, 1.0)))
    if max_per_batch is not None:
        k = min(k, max(1, int(max_per_batch)))
    return max(1, min(k, n))


def _sender_list(senders: str, n_layers: int, n_heads: int, below_layer: int | None = None):
    if senders not in ("heads", "mlps", "both"):
        raise ValueError(f"senders must be 'heads', 'mlps' or 'both'; got {senders!r}.")
    top = n_layers if below_layer is None else below_layer
    out = []
    if senders in ("heads", "both"):
        out += [("head", l, h) for l in range(top) for h in range(n_heads)]
    if senders in ("mlps", "both"):
        out += [("mlp", l, None) for l in range(top)]
    # Order by where the sender's change enters the residual stream: head l at resid_mid[l]
    # (key 2l+1), MLP l at resid_pre[l+1] (key 2l+2). Chunks of consecutive senders then share work.
    out.sort(key=lambda s: 2 * s[1] + (1 if s[0] == "head" else 2))
    return out


def _entry_key(sender) -> int:
    kind, layer, _ = sender
    return 2 * layer + (1 if kind == "head" else 2)


def _assemble(values: dict, senders: str, n_layers: int, n_heads: int, device):
    """Stack per-sender metric values into ``[L, H, *shape]`` / ``[L, *shape]`` (NaN elsewhere)."""
    shape = next(iter(values.values())).shape if values else ()
    heads = torch.full((n_layers, n_heads, *shape), float("nan"), device=device)
    mlps = torch.full((n_layers, *shape), float("nan"), device=device)
    for (kind, layer, head), value in values.items():
        if kind == "head":
            heads[layer, head] = value.to(device)
        else:
            mlps[layer] = value.to(device)
    if senders == "heads":
        return heads
    if senders == "mlps":
        return mlps
    return PathPatchResult(heads=heads, mlps=mlps)


# ----------------------------------------------------------------------------------------------
# The frozen-heads propagation (position-wise)
# ----------------------------------------------------------------------------------------------


class _Rows:
    """Residual rows ``(n, p)`` of the frozen-heads run, with memoised gathers of cached tensors."""

    def __init__(self, rows_n: Tensor, rows_p: Tensor, patched: Tensor):
        self.n, self.p = rows_n, rows_p
        self.scale = patched.to(torch.float32)[:, None]  # [M, 1]: 1 where the sender is patched
        self._memo: dict = {}

    def __len__(self) -> int:
        return len(self.n)

    def get(self, cache: _Cache, name: str) -> Tensor:
        key = (id(cache), name)
        if key not in self._memo:
            self._memo[key] = cache[name][self.n, self.p].contiguous()
        return self._memo[key]


def _ranges(chunk: list, predicate) -> tuple[int, int] | None:
    """The contiguous index range of the (sorted) chunk whose senders satisfy ``predicate``."""
    idx = [i for i, s in enumerate(chunk) if predicate(s)]
    if not idx:
        return None
    assert idx == list(range(idx[0], idx[-1] + 1))
    return idx[0], idx[-1] + 1


def _propagate(
    net: _Net,
    oc: _Cache,
    nc: _Cache,
    chunk: list,
    rows: _Rows,
    *,
    stop: int,
    record_layers: Sequence[int] = (),
    freeze_mlps: bool = False,
    mlp_keep: Tensor | None = None,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Run the frozen-heads forward for ``k`` (sorted) senders on the residual ``rows``.

    Returns ``d [k, M, D]``, the change of ``resid_pre[stop]`` (``stop == n_layers``: the final
    residual stream) relative to ``x_orig``, and ``records[l]``: ``ln1(resid_pre[l])`` of the
    patched run at layers ``record_layers`` (for the receivers' ``q``/``k``/``v``).
    """
    k, M, D = len(chunk), len(rows), net.d_model
    d = torch.zeros(k, M, D, device=rows.n.device, dtype=net.W_O.dtype)
    records: dict[int, Tensor] = {}
    scale = rows.scale.to(d.dtype)
    keys = [_entry_key(s) for s in chunk]
    first = min(keys) // 2 if keys else stop
    if record_layers:
        first = min(first, min(record_layers))
    mlp_keep_rows = None
    if mlp_keep is not None:
        mlp_keep_rows = mlp_keep[rows.n, rows.p].to(d.dtype)  # [M, L]
    for layer in range(first, stop + 1):
        # ---- resid_pre[layer]: MLP senders of layer - 1 enter here ----
        r = _ranges(chunk, lambda s: s[0] == "mlp" and s[1] == layer - 1)
        if r is not None:
            mo = f"blocks.{layer - 1}.hook_mlp_out"
            d[r[0] : r[1]] += (rows.get(nc, mo) - rows.get(oc, mo)) * scale
        if layer in record_layers:
            x = rows.get(oc, f"blocks.{layer}.hook_resid_pre") + d
            records[layer] = net.ln(x, net.ln1[layer])
        if layer == stop:
            break
        # ---- resid_mid[layer]: head senders of this layer enter here ----
        r = _ranges(chunk, lambda s: s[0] == "head" and s[1] == layer)
        if r is not None:
            heads = [chunk[i][2] for i in range(r[0], r[1])]
            zn = f"blocks.{layer}.attn.hook_z"
            dz = (rows.get(nc, zn)[:, heads] - rows.get(oc, zn)[:, heads]) * scale[:, :, None]
            d[r[0] : r[1]] += torch.einsum("mhe,hed->hmd", dz, net.W_O[layer, heads])
        n_active = sum(1 for key in keys if key <= 2 * layer + 1)
        if n_active == 0 or freeze_mlps or not net.has_mlps:
            continue
        resid_mid = rows.get(oc, f"blocks.{layer}.hook_resid_mid")  # [M, D]
        mlp_out = rows.get(oc, f"blocks.{layer}.hook_mlp_out")
        keep_rows = None if mlp_keep_rows is None else mlp_keep_rows[:, layer, None]
        # In tiles of whole senders x a block of rows: d[s, m] += MLP(resid_mid[m] + d[s, m]) - mlp_out[m]
        for ss, ms in patch_row_tiles(n_active, M, d.device):
            tile = d[ss, ms]
            change = net.mlp(layer, resid_mid[ms] + tile) - mlp_out[ms]
            if keep_rows is not None:
                change = change * keep_rows[ms]
            tile += change
    return d, records


# ----------------------------------------------------------------------------------------------
# The resumed forward on a per-prompt window of positions (step 3)
# ----------------------------------------------------------------------------------------------


class _Gather:
    """Memoised ``cache[name][sel]`` for one bucket of prompts."""

    def __init__(self, cache: _Cache, sel: Tensor):
        self.cache, self.sel = cache, sel
        self._memo: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._memo:
            self._memo[name] = self.cache[name][self.sel].contiguous()
        return self._memo[name]

    def permuted(self, name: str, dims: tuple[int, ...]) -> Tensor:
        key = f"{name}:{dims}"
        if key not in self._memo:
            self._memo[key] = self[name].permute(*dims).contiguous()
        return self._memo[key]


def _window_attention(
    net: _Net,
    oc: _Gather,
    layer: int,
    heads: list[int] | None,
    q: Tensor,
    kk: Tensor,
    v: Tensor,
    pre_bias: Tensor,
    win_bias: Tensor,
) -> Tensor:
    """Attention of window queries ``q [b, n, w, h, dh]`` over the cached ``x_orig`` keys/values
    before the window (prefix) and the window's own ``kk``/``v [b', n, W, h, dh]`` (causal
    ``win_bias [w, W]``); ``heads``: which of the layer's heads ``h`` indexes (``None``: all).
    Returns ``z [max(b, b'), n, w, h, dh]``."""
    K_preT = oc.permuted(f"blocks.{layer}.attn.hook_k", (0, 2, 3, 1))  # [n, H, dh, S]
    V_pre = oc.permuted(f"blocks.{layer}.attn.hook_v", (0, 2, 1, 3))  # [n, H, S, dh]
    if heads is not None:
        K_preT, V_pre = K_preT[:, heads], V_pre[:, heads]
    # [n, h, batch, rows, dh] layout: one batched matmul per (prompt, head)
    qh = q.permute(1, 3, 0, 2, 4) / net.scale  # [n, h, bq, w, dh]
    kh = kk.permute(1, 3, 0, 4, 2)  # [n, h, bk, dh, W]
    vh = v.permute(1, 3, 0, 2, 4)  # [n, h, bv, W, dh]
    n, h, bq, w, _ = qh.shape
    S = K_preT.shape[-1]
    # The prefix is the same for every sender: the senders' rows are stacked into one
    # [bq * w, dh] operand per (prompt, head) instead of broadcasting (copying) K/V bq times.
    qh = qh.reshape(n, h, bq * w, -1)
    s_pre = torch.matmul(qh, K_preT).view(n, h, bq, w, S) + pre_bias[:, None, None, None, :]
    s_win = torch.matmul(qh.view(n, h, bq, w, -1), kh) + win_bias
    m = torch.maximum(s_pre.amax(dim=-1, keepdim=True), s_win.amax(dim=-1, keepdim=True))
    e_pre = (s_pre - m).exp_()
    e_win = (s_win - m).exp_()
    denom = e_pre.sum(dim=-1, keepdim=True) + e_win.sum(dim=-1, keepdim=True)
    B = e_pre.shape[2]  # max(bq, bk): the window's keys may differ per sender where the queries do not
    z_pre = torch.matmul(e_pre.view(n, h, B * w, S), V_pre).view(n, h, B, w, -1)
    zh = (z_pre + torch.matmul(e_win, vh)) / denom
    return zh.permute(2, 0, 3, 1, 4)  # [b, n, w, h, dh]


def _window_last_layer_end(net: _Net, oc: _Gather, layer: int, h: Tensor, pre_bias: Tensor) -> Tensor:
    """The last layer's attention for the last window row only, ``z [b, n, 1, H, dh]``, from the
    LayerNorm-ed window rows ``h [b, n, W, D]``, without projecting the window's keys/values:
    ``q . (x W_K + b_K) = x . (W_K q) + q . b_K`` and ``sum_j p_j (x_j W_V + b_V) = (sum_j p_j x_j)
    W_V + (sum_j p_j) b_V`` (the same maths reassociated; prefix keys/values from the cache)."""
    H, dh = net.n_heads, net.d_head
    b, n = h.shape[:2]
    q = net._linear(h[:, :, -1], net.weights.W_q[layer], net.weights.b_q[layer]).view(b, n, H, dh) / net.scale
    u = torch.einsum("bnhe,hde->bnhd", q, net.W_K[layer])  # [b, n, H, D]
    s_win = torch.einsum("bnwd,bnhd->bnhw", h, u) + (q * net.b_K[layer]).sum(-1)[..., None]
    K_preT = oc.permuted(f"blocks.{layer}.attn.hook_k", (0, 2, 3, 1))  # [n, H, dh, S]
    V_pre = oc.permuted(f"blocks.{layer}.attn.hook_v", (0, 2, 1, 3))  # [n, H, S, dh]
    s_pre = torch.einsum("bnhe,nhes->bnhs", q, K_preT) + pre_bias[None, :, None, :]
    m = torch.maximum(s_pre.amax(dim=-1, keepdim=True), s_win.amax(dim=-1, keepdim=True))
    e_pre = (s_pre - m).exp_()
    e_win = (s_win - m).exp_()
    denom = e_pre.sum(dim=-1, keepdim=True) + e_win.sum(dim=-1, keepdim=True)
    mixed = torch.einsum("bnhw,bnwd->bnhd", e_win, h)  # [b, n, H, D]
    z = (
        torch.einsum("bnhd,hde->bnhe", mixed, net.W_V[layer])
        + e_win.sum(-1)[..., None] * net.b_V[layer]
        + torch.einsum("bnhs,nhse->bnhe", e_pre, V_pre)
    ) / denom
    return z.unsqueeze(2)


def _window_start_layer(
    net: _Net,
    oc: _Gather,
    nidx: Tensor,
    pos: Tensor,
    layer: int,
    k: int,
    x: Tensor,
    receivers: list[tuple[int, str, Tensor, Tensor]],
    rows: slice,
    pre_bias: Tensor,
    win_bias: Tensor,
) -> Tensor:
    """The first receiver layer of step 3 without a knockout: ``resid_post [k, n, w, D]``.

    Only the receivers' attention changes there, so it is recomputed for the receiver heads alone
    (their ``x_orig`` q/k/v from ``x = resid_pre [1, n, W, D]``, the recorded inputs substituted);
    ``resid_mid = resid_mid_orig + sum_h dz_h W_O[h]`` and the MLP sees a rank-``d_head`` change
    per receiver (:meth:`~ioi.patching._fast_forward.NetWeights.add_mlp_low_rank_`): the same maths
    as a full layer, reassociated.
    """
    rheads = sorted({head for head, *_ in receivers})
    col = {head: j for j, head in enumerate(rheads)}
    h = net.ln(x, net.ln1[layer])  # [1, n, W, D]
    tensors = {}
    for which, Wt, bt in (("q", net.W_Q, net.b_Q), ("k", net.W_K, net.b_K), ("v", net.W_V, net.b_V)):
        tensors[which] = torch.einsum("bnwd,hde->bnwhe", h, Wt[layer, rheads]) + bt[layer, rheads]
    base = {w: t for w, t in tensors.items()}
    for head, which, mask, values in receivers:
        t = tensors[which]
        if t.shape[0] != k:
            t = t.expand(k, *t.shape[1:]).clone()
        j = col[head]
        t[:, :, :, j] = torch.where(mask[None, :, :, None], values, t[:, :, :, j])
        tensors[which] = t
    q_rows = lambda t: t[:, :, rows]  # noqa: E731
    z_new = _window_attention(net, oc, layer, rheads, q_rows(tensors["q"]), tensors["k"], tensors["v"],
                              pre_bias, win_bias)
    z_old = _window_attention(net, oc, layer, rheads, q_rows(base["q"]), base["k"], base["v"], pre_bias, win_bias)
    dz = z_new - z_old  # [k, n, w, h, dh]
    w = dz.shape[2]
    n = dz.shape[1]
    mid_old = oc[f"blocks.{layer}.hook_resid_mid"][nidx[:, rows], pos[:, rows]]  # [n, w, D]
    dz_flat = dz.reshape(k, n * w, len(rheads) * net.d_head)
    W_O = net.W_O[layer, rheads].reshape(-1, net.d_model)
    x_mid = torch.matmul(dz_flat, W_O).add_(mid_old.reshape(1, n * w, net.d_model))  # [k, n*w, D]
    if net.has_mlps:
        factors = net.weights.mlp_in_head_factors_cached(layer)[rheads].reshape(-1, net.weights.d_mlp)
        shared = net.weights.mlp_in_shared(layer, mid_old.reshape(n * w, net.d_model))
        low_rank = torch.matmul(dz_flat, factors)
        net.weights.add_mlp_low_rank_(layer, x_mid, shared, low_rank)
    return x_mid.view(k, n, w, net.d_model)


def _window_forward(
    net: _Net,
    oc: _Gather,
    sel: Tensor,
    a: Tensor,
    width: int,
    start: int,
    k: int,
    replacements: dict[int, list[tuple[int, str, Tensor, Tensor]]],
    knockout,
    last_row_only: bool,
    shortcuts: bool = True,
) -> tuple[Tensor, Tensor]:
    """Forward from ``resid_pre[start]`` on positions ``a[n] .. a[n] + width - 1`` of prompts ``sel``.

    Positions before ``a[n]`` are unchanged (causal attention): their keys/values come from the
    ``x_orig`` cache. ``replacements[l]`` lists ``(head, "q"|"k"|"v", mask [n, W], values
    [k, n, W, dh])``: the head's input is replaced where ``mask``. With ``last_row_only`` the last
    layer is computed for the last window row only (all a metric reading that row needs).
    Returns the final residual ``[k, n, W or 1, D]`` and the window positions ``[n, W]``.

    ``shortcuts`` (exact; off only to test them): without a knockout, the first layer recomputes
    only the receivers' attention and a low-rank MLP input (:func:`_window_start_layer`); with
    ``last_row_only`` and no receiver in the last layer, that layer never projects the window's
    keys/values (:func:`_window_last_layer_end`).
    """
    n = len(sel)
    S = oc[f"blocks.{start}.hook_resid_pre"].shape[1]
    H, dh = net.n_heads, net.d_head
    device = a.device
    W = width
    L = net.n_layers
    pos = (a[:, None] + torch.arange(W, device=device)[None, :]).clamp(max=S - 1)  # [n, W]
    nidx = torch.arange(n, device=device)[:, None].expand(n, W)
    gidx = sel[:, None].expand(n, W)
    prefix_ok = torch.arange(S, device=device)[None, :] < a[:, None]  # [n, S]
    causal = torch.ones(W, W, dtype=torch.bool, device=device).tril()
    dtype = net.W_O.dtype
    pre_bias = torch.zeros(n, S, device=device, dtype=dtype).masked_fill(~prefix_ok, float("-inf"))
    win_bias = torch.zeros(W, W, device=device, dtype=dtype).masked_fill(~causal, float("-inf"))

    x = oc[f"blocks.{start}.hook_resid_pre"][nidx, pos].unsqueeze(0)  # [1, n, W, D]
    first = start
    if shortcuts and knockout is None and start in replacements:
        rows = slice(W - 1, W) if (last_row_only and start == L - 1) else slice(0, W)
        x = _window_start_layer(net, oc, nidx, pos, start, k, x, replacements[start], rows, pre_bias,
                                win_bias[rows])
        first = start + 1
    for layer in range(first, L):
        end_only = last_row_only and layer == L - 1
        rows = slice(W - 1, W) if end_only else slice(0, W)
        if shortcuts and end_only and layer not in replacements:
            z = _window_last_layer_end(net, oc, layer, net.ln(x, net.ln1[layer]), pre_bias)
            x = x[:, :, rows]
        else:
            h = net.ln(x, net.ln1[layer])
            qkv = net._linear(h, net.W_qkv[layer], net.b_qkv[layer])
            q, kk, v = (t.reshape(*t.shape[:-1], H, dh) for t in qkv.split(H * dh, dim=-1))
            if layer in replacements:
                tensors = {"q": q, "k": kk, "v": v}
                for head, which, mask, values in replacements[layer]:
                    t = tensors[which]
                    if t.shape[0] != k:
                        t = t.expand(k, *t.shape[1:]).clone()
                    t[:, :, :, head] = torch.where(mask[None, :, :, None], values, t[:, :, :, head])
                    tensors[which] = t
                q, kk, v = tensors["q"], tensors["k"], tensors["v"]
            q, x = q[:, :, rows], x[:, :, rows]
            z = _window_attention(net, oc, layer, None, q, kk, v, pre_bias, win_bias[rows])
        if knockout is not None and knockout.head_keep is not None:
            keep = knockout.head_keep[gidx[:, rows], pos[:, rows], layer]  # [n, w, H]
            means = knockout.head_means[gidx[:, rows], pos[:, rows], layer]  # [n, w, H, dh]
            z = torch.where(keep[None, ..., None], z, means[None])
        attn_out = net._linear(z.reshape(*z.shape[:-2], H * dh), net.W_O_flat[layer], net.b_O[layer])
        x = x + attn_out
        if net.has_mlps:
            mlp_out = net.mlp(layer, x)
            if knockout is not None and knockout.mlp_keep is not None:
                keep = knockout.mlp_keep[gidx[:, rows], pos[:, rows], layer]
                means = knockout.mlp_means[gidx[:, rows], pos[:, rows], layer]
                mlp_out = torch.where(keep[None, ..., None], mlp_out, means[None])
            x = x + mlp_out
    if last_row_only and x.shape[2] != 1:
        x = x[:, :, W - 1 : W]
    if x.shape[0] != k:
        x = x.expand(k, *x.shape[1:])
    return x, pos


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _as_value(value) -> Tensor:
    return torch.as_tensor(value).detach().float()


@torch.no_grad()
def path_patch_to_logits(
    model,
    orig_toks: Int[Tensor, "batch seq"],
    new_toks: Int[Tensor, "batch seq"],
    metric: Callable[[Tensor], Tensor],
    *,
    sender_positions: Positions = None,
    senders: SenderKind = "heads",
    knockout=None,
    freeze_mlps: bool = False,
    progress: bool = True,
    max_senders_per_batch: int | None = None,
    memory_budget_mb: float | None = None,
    cache: PathPatchCache | None = None,
) -> Tensor | PathPatchResult:
    """Path patching from every head (and/or MLP) to the final residual stream (the logits).

    Args:
        model: a processed TransformerBridge (GPT-2 architecture).
        orig_toks, new_toks: position-aligned ``[N, seq]`` batches (``x_orig`` ~ p_IOI, ``x_new``
            ~ p_ABC), right-padded.
        metric: an :class:`ioi.metrics.LogitDiff` (fast path: END rows and two logits only) or any
            callable on full logits ``[N, seq, vocab]`` (exact, slower).
        sender_positions: where the sender is patched, per prompt (e.g. ``word_idx["END"]``, or a
            list/dict of several such tensors); ``None`` = every position.
        senders: ``"heads"`` -> ``Tensor[n_layers, n_heads]``; ``"mlps"`` -> ``Tensor[n_layers]``;
            ``"both"`` -> :class:`PathPatchResult`. A per-prompt metric adds a trailing ``[N]`` axis.
        knockout: an :class:`ioi.ablation.Ablation` applied in every run (the paper code's
            ``extra_hooks``: the x_orig and x_new runs, the patched run and, for head receivers,
            the final run), e.g. the name movers mean-ablated at END for the paper's Fig. 15:
            ``knockout=head_knockout(means, {(9, 9): end, (9, 6): end, (10, 0): end})``. A
            normalised metric should then use the knocked-out model's clean LD as its baseline.
        freeze_mlps: also freeze every MLP other than the sender (default: recompute, as the paper).
        max_senders_per_batch, memory_budget_mb: how many senders share one batched pass (chunked
            to the budget; defaults 1 GiB on CPU, 4 GiB on CUDA).
        cache: a :class:`PathPatchCache` from :func:`prepare_path_patching` (same model, tokens
            and knockout) to skip the two forward passes on ``x_orig`` and ``x_new``.
    """
    orig_toks, new_toks = _check_inputs(model, orig_toks, new_toks, knockout)
    if cache is not None:
        cache.check(model, orig_toks, new_toks, knockout)
    net = _Net.from_model(model) if cache is None else cache.net
    L, H = net.n_layers, net.n_heads
    N, S = orig_toks.shape
    device = orig_toks.device
    sender_list = _sender_list(senders, L, H)
    is_ld = _is_logit_diff(metric)
    if is_ld and len(metric.end_idx) != N:
        raise ValueError(f"The metric is for {len(metric.end_idx)} prompts; the batch has {N}.")
    P = positions_mask(sender_positions, N, S, device)

    names_orig = {f"blocks.{l}.attn.hook_z" for l in range(L)}
    names_orig |= {f"blocks.{l}.hook_resid_mid" for l in range(L)}
    names_orig |= {f"blocks.{l}.hook_mlp_out" for l in range(L)}
    names_orig.add(f"blocks.{L - 1}.hook_resid_post")
    names_new = {f"blocks.{l}.attn.hook_z" for l in range(L)}
    if senders != "heads":
        names_new |= {f"blocks.{l}.hook_mlp_out" for l in range(L)}
    if cache is None:
        # A LogitDiff reads each prompt's END row only: nothing after END is computed, and the
        # last layer past its keys/values is computed at END alone.
        last = metric.end_idx.to(device).long() if is_ld else None
        oc = _forward_cache(net, orig_toks, names_orig, knockout, last=last, last_layer_last_row_only=is_ld)
        nc = _forward_cache(net, new_toks, names_new, knockout, last=last, last_layer_last_row_only=is_ld)
    else:
        oc, nc = cache.orig, cache.new
    mlp_keep = None if knockout is None else knockout.mlp_keep

    if is_ld:
        end = metric.end_idx.to(device).long()
        rows_n = torch.arange(N, device=device)
        rows_p = end
        row_patched = P[rows_n, rows_p]
        vocab_bytes = 0
    else:
        rows_n, rows_p = P.nonzero(as_tuple=True)
        row_patched = torch.ones_like(rows_n, dtype=torch.bool)
        vocab_bytes = net.W_U.shape[1] * len(rows_n) * _BYTES
    rows = _Rows(rows_n, rows_p, row_patched)
    M = len(rows_n)
    d_mlp = net.W_in.shape[-1] if net.has_mlps else 0
    per_sender = M * (4 * net.d_model + 2 * d_mlp) * _BYTES + vocab_bytes
    k_max = _chunk_size(per_sender, _budget_bytes(memory_budget_mb, device), len(sender_list), max_senders_per_batch)

    results: dict = {}
    final_name = f"blocks.{L - 1}.hook_resid_post"
    bar = tqdm(total=len(sender_list), desc="path patching -> logits", disable=not progress)
    for start in range(0, len(sender_list), k_max):
        chunk = sender_list[start : start + k_max]
        d, _ = _propagate(
            net, oc, nc, chunk, rows, stop=L, freeze_mlps=freeze_mlps, mlp_keep=mlp_keep
        )
        resid = rows.get(oc, final_name) + d  # [k, M, D]
        if is_ld:
            io = net.answer_logits(resid, metric.io_ids.to(device).long())
            s = net.answer_logits(resid, metric.s_ids.to(device).long())
            values = metric.from_answer_logits(io, s)
            for i, sender in enumerate(chunk):
                results[sender] = _as_value(values[i])
        else:
            for i, sender in enumerate(chunk):
                logits = _orig_logits(net, oc).clone()
                if M:
                    logits[rows_n, rows_p] = net.logits(resid[i])
                results[sender] = _as_value(metric(logits))
        bar.update(len(chunk))
    bar.close()
    return _assemble(results, senders, L, H, device)


def _validate_receivers(receivers, receiver_input, n_layers: int, n_heads: int) -> list[Head]:
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v'; got {receiver_input!r}.")
    try:
        heads = [(int(l), int(h)) for l, h in receivers]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"receivers must be a list of (layer, head) pairs; got {receivers!r}."
        ) from err
    if not heads:
        raise ValueError("receivers is empty: pass at least one (layer, head).")
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"Receiver head {layer}.{head} does not exist in a model with {n_layers} layers x "
                f"{n_heads} heads."
            )
    return list(dict.fromkeys(heads))


@torch.no_grad()
def path_patch_to_heads(
    model,
    orig_toks: Int[Tensor, "batch seq"],
    new_toks: Int[Tensor, "batch seq"],
    metric: Callable[[Tensor], Tensor],
    receivers: Sequence[Head],
    receiver_input: ReceiverInput,
    *,
    sender_positions: Positions = None,
    receiver_positions: Positions = None,
    senders: SenderKind = "heads",
    knockout=None,
    freeze_mlps: bool = False,
    progress: bool = True,
    max_senders_per_batch: int | None = None,
    memory_budget_mb: float | None = None,
    cache: PathPatchCache | None = None,
) -> Tensor | PathPatchResult:
    """Path patching from every head (sender) to the ``q``/``k``/``v`` inputs of ``receivers``.

    Returns ``Tensor[n_layers, n_heads]`` (``senders="heads"``), NaN for senders in the last
    receiver layer or later (they cannot reach a receiver). ``receiver_positions``: where the
    receivers' inputs are patched, per prompt (e.g. END for name-mover queries, S2 for S-inhibition
    values/keys, S1+1 for induction keys); ``None`` = every position. Other arguments as
    :func:`path_patch_to_logits`.
    """
    orig_toks, new_toks = _check_inputs(model, orig_toks, new_toks, knockout)
    if cache is not None:
        cache.check(model, orig_toks, new_toks, knockout)
    net = _Net.from_model(model) if cache is None else cache.net
    L, H = net.n_layers, net.n_heads
    heads = _validate_receivers(receivers, receiver_input, L, H)
    N, S = orig_toks.shape
    device = orig_toks.device
    max_lr = max(l for l, _ in heads)
    min_lr = min(l for l, _ in heads)
    receiver_layers = sorted({l for l, _ in heads})
    sender_list = _sender_list(senders, L, H, below_layer=max_lr)
    is_ld = _is_logit_diff(metric)
    if is_ld and len(metric.end_idx) != N:
        raise ValueError(f"The metric is for {len(metric.end_idx)} prompts; the batch has {N}.")
    P = positions_mask(sender_positions, N, S, device)
    R = positions_mask(receiver_positions, N, S, device)

    which = receiver_input
    names_orig = {f"blocks.{l}.attn.hook_z" for l in range(max_lr)}
    names_orig |= {f"blocks.{l}.hook_resid_mid" for l in range(max_lr)}
    names_orig |= {f"blocks.{l}.hook_mlp_out" for l in range(max_lr)}
    names_orig |= {f"blocks.{l}.hook_resid_pre" for l in receiver_layers}
    names_orig.add(f"blocks.{min_lr}.hook_resid_pre")
    names_orig.add(f"blocks.{min_lr}.hook_resid_mid")  # step 3's first layer (_window_start_layer)
    names_orig |= {f"blocks.{l}.attn.hook_{x}" for l in range(min_lr, L) for x in ("k", "v")}
    names_orig |= {f"blocks.{l}.attn.hook_{which}" for l in receiver_layers}
    names_new = {f"blocks.{l}.attn.hook_z" for l in range(max_lr)}
    if senders != "heads":
        names_new |= {f"blocks.{l}.hook_mlp_out" for l in range(max_lr)}
    names_orig.add(f"blocks.{L - 1}.hook_resid_post")
    if cache is None:
        # A LogitDiff reads each prompt's END row only, so no position after END is computed.
        last = metric.end_idx.to(device).long() if is_ld else None
        oc = _forward_cache(net, orig_toks, names_orig, knockout, last=last)
        nc = _forward_cache(net, new_toks, names_new, knockout, n_layers=max_lr, last=last)
    else:
        oc, nc = cache.orig, cache.new
    mlp_keep = None if knockout is None else knockout.mlp_keep

    # Step 3 only changes positions from the first patched receiver row on (causal attention),
    # and only positions up to the last one the metric reads matter.
    if is_ld:
        b = metric.end_idx.to(device).long()
        io_ids, s_ids = metric.io_ids.to(device).long(), metric.s_ids.to(device).long()
    else:
        b = torch.full((N,), S - 1, device=device, dtype=torch.long)
    seq_pos = torch.arange(S, device=device)[None, :].expand(N, S)
    C = P & R & (seq_pos <= b[:, None])  # receiver rows whose recorded input can differ
    first = torch.where(C, seq_pos, S).min(dim=1).values
    a = torch.where(C.any(dim=1), first, b)
    rows_n, rows_p = C.nonzero(as_tuple=True)
    M = len(rows_n)
    rows = _Rows(rows_n, rows_p, torch.ones(M, dtype=torch.bool, device=device))

    # Prompts bucketed by window length (no padding waste; last row = each prompt's END).
    width = b - a + 1
    buckets = []
    for w in width.unique().tolist():
        sel = (width == w).nonzero().flatten()
        local = torch.full((N,), -1, dtype=torch.long, device=device)
        local[sel] = torch.arange(len(sel), device=device)
        in_bucket = local[rows_n] >= 0
        b_rows = in_bucket.nonzero().flatten()
        win = (a[sel, None] + torch.arange(w, device=device)[None, :]).clamp(max=S - 1)
        win_R = R[sel[:, None], win] & (a[sel, None] + torch.arange(w, device=device)[None, :] <= b[sel, None])
        orig_in = {
            (layer, head): oc[f"blocks.{layer}.attn.hook_{which}"][sel[:, None], win, head]
            for layer, head in heads
        }
        buckets.append(dict(
            w=int(w), sel=sel, a=a[sel], gather=_Gather(oc, sel), win=win, win_R=win_R,
            b_rows=b_rows, b_n=local[rows_n[b_rows]], b_j=(rows_p - a[rows_n])[b_rows], orig_in=orig_in,
        ))
    heads_by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        heads_by_layer.setdefault(layer, []).append(head)

    d_mlp = net.W_in.shape[-1] if net.has_mlps else 0
    D = net.d_model
    W_max = int(width.max())
    step2 = M * (4 * D + 2 * d_mlp + 2 * len(heads) * net.d_head) * _BYTES
    step3 = N * W_max * (8 * D + 2 * d_mlp + 3 * H * (S + W_max) + 8 * H * net.d_head) * _BYTES
    if not is_ld:
        step3 += N * W_max * net.W_U.shape[1] * _BYTES
    k_max = _chunk_size(
        max(step2, step3), _budget_bytes(memory_budget_mb, device), max(1, len(sender_list)), max_senders_per_batch
    )

    results: dict = {}
    bar = tqdm(total=len(sender_list), desc=f"path patching -> {which}", disable=not progress)
    for start in range(0, len(sender_list), k_max):
        chunk = sender_list[start : start + k_max]
        k = len(chunk)
        _, records = _propagate(
            net, oc, nc, chunk, rows,
            stop=max_lr, record_layers=receiver_layers, freeze_mlps=freeze_mlps, mlp_keep=mlp_keep,
        )
        recorded = {
            (layer, head): net.head_input(layer, head, which, records[layer]) for layer, head in heads
        }  # [k, M, dh] each
        if is_ld:
            io = torch.empty(k, N, device=device, dtype=net.W_O.dtype)
            s = torch.empty_like(io)
        else:
            outs = []
        for bk in buckets:
            n_b, w = len(bk["sel"]), bk["w"]
            replacements: dict[int, list] = {}
            for layer, layer_heads in heads_by_layer.items():
                for head in layer_heads:
                    values = bk["orig_in"][(layer, head)].unsqueeze(0).expand(k, n_b, w, net.d_head).clone()
                    if len(bk["b_rows"]):
                        values[:, bk["b_n"], bk["b_j"]] = recorded[(layer, head)][:, bk["b_rows"]]
                    replacements.setdefault(layer, []).append((head, which, bk["win_R"], values))
            x, pos = _window_forward(
                net, bk["gather"], bk["sel"], bk["a"], w, min_lr, k, replacements, knockout,
                last_row_only=is_ld,
            )
            if is_ld:
                last = x[:, :, -1]  # [k, n_b, D]: each prompt's END
                io[:, bk["sel"]] = net.answer_logits(last, io_ids[bk["sel"]])
                s[:, bk["sel"]] = net.answer_logits(last, s_ids[bk["sel"]])
            else:
                outs.append((bk, x, pos))
        if is_ld:
            values = metric.from_answer_logits(io, s)
            for i, sender in enumerate(chunk):
                results[sender] = _as_value(values[i])
        else:
            for i, sender in enumerate(chunk):
                logits = _orig_logits(net, oc).clone()
                for bk, x, pos in outs:
                    n_b, w = pos.shape
                    sel_rows = bk["sel"][:, None].expand(n_b, w)
                    logits[sel_rows, pos] = net.logits(x[i])
                results[sender] = _as_value(metric(logits))
        bar.update(k)
    bar.close()
    return _assemble(results, senders, L, H, device)
