"""Activation patching: a drop-in for ``transformer_lens.patching``, same numbers, much less work.

Every ``get_act_patch_*`` function here has the name, the first four arguments
``(model, corrupted_tokens, clean_cache, patching_metric)``, the output shape and the semantics of
its ``transformer_lens.patching`` namesake: **denoising** patches, one location at a time, of the
clean run's activation (read from ``clean_cache``) into a run on ``corrupted_tokens``; each output
cell is ``patching_metric(patched_logits)`` for one patch. Position axes run over every position of
the padded batch (padding included) unless ``positions=`` restricts them.

How it is faster (all exact; see :mod:`ioi.patching._fast_forward`):

* one unpatched forward on the corrupted tokens is cached (residual stream, ``q|k|v``, ``z``);
  a patch at layer ``L`` resumes from there, so layers before ``L`` are never re-run;
* a head patch (``z``/``q``/``k``/``v``/pattern) only changes that head's output: layer ``L``'s
  attention is recomputed for the patched quantity only, the change ``dz @ W_O`` is added to the
  cached ``resid_mid``, and layer ``L``'s MLP input projection is computed from the rank-``d_head``
  change (``dz @ (W_O[h] W_in)`` plus a term shared by all heads) instead of a full matmul;
* only rows that can change are recomputed: per prompt, from the first patched (or first
  clean/corrupted-differing) position to the last position the metric reads; other rows' keys and
  values come from the cache;
* with an :class:`ioi.metrics.LogitDiff` metric, the last layer runs only at each prompt's END
  (its keys/values enter through ``W_K q`` and the pattern-weighted mean of the inputs, never as
  full projections) and the unembedding computes only the IO and S columns (no
  ``[batch, pos, vocab]`` logits);
* many patches run in one batched pass (memory-budgeted), under ``torch.inference_mode``.

Any other callable metric gets full ``[batch, pos, d_vocab]`` logits per patch (the exact, slower
path; still with the shortcuts above for the transformer blocks).

Extra keyword options of every function: ``clean_tokens=`` (with ``clean_cache=None`` the clean
activations are cached here, only those needed), ``positions=`` (restrict/choose the position axis,
including per-prompt positions such as ``{"S2": ds.word_idx["S2"], "END": ds.word_idx["END"]}``),
``batch_size=`` / ``memory_budget_mb=`` (patches per batched pass), ``progress=`` (tqdm),
``device=`` (where the work runs; the result is returned on ``model.cfg.device`` like TL),
``verify=`` (check the re-implementation's unpatched corrupted logits against one bridge forward,
default on) and ``shared_prefix=`` (skip positions where clean and corrupted inputs agree, default
on).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ioi.patching._chunking import (
    PositionsArg,
    bytes_per_patch,
    chunk_size,
    position_table,
    shared_prefix_lengths,
)
from ioi.patching._fast_forward import (
    STAGES,
    CorruptedRun,
    Entry,
    NetWeights,
    ResumeForward,
    RowSet,
    causal_pattern,
    net_weights,
    unsupported_reason,
)
from ioi.validation import check_tokens

__all__ = [
    "get_act_patch_resid_pre",
    "get_act_patch_resid_mid",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_block_every",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_by_pos_every",
    "PatchingMetric",
]

PatchingMetric = Callable[[Float[Tensor, "batch pos d_vocab"]], Any]

# kind -> (stage the patched stream joins at, clean hook name template)
_KINDS: dict[str, tuple[str, str]] = {
    "resid_pre": ("pre", "blocks.{layer}.hook_resid_pre"),
    "resid_mid": ("mid", "blocks.{layer}.hook_resid_mid"),
    "attn_out": ("mid", "blocks.{layer}.hook_attn_out"),
    "mlp_out": ("post", "blocks.{layer}.hook_mlp_out"),
    "z": ("mid", "blocks.{layer}.attn.hook_z"),
    "q": ("mid", "blocks.{layer}.attn.hook_q"),
    "k": ("mid", "blocks.{layer}.attn.hook_k"),
    "v": ("mid", "blocks.{layer}.attn.hook_v"),
    "pattern": ("mid", "blocks.{layer}.attn.hook_pattern"),
    "pattern_src": ("mid", "blocks.{layer}.attn.hook_pattern"),
}
_HEAD_KINDS = ("z", "q", "k", "v", "pattern", "pattern_src")
_EMBED_NAME = "blocks.0.hook_resid_pre"
_KIND_ORDER = {kind: i for i, kind in enumerate(_KINDS)}


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One patch: ``kind`` at ``layer`` (``head``), at position entry ``pos`` (None = all positions;
    for ``pattern_src``: destination entry ``pos``, source entry ``src``); result cell ``out``."""

    kind: str
    layer: int
    head: int | None
    pos: int | None
    src: int | None
    out: tuple[int, ...]

    def resume_point(self, n_layers: int, low_rank_mlp: bool) -> tuple[int, int]:
        """(layer, stage index) where the patched stream joins the resumed forward. Head patches
        below the last layer join after their layer's MLP when it is computed low-rank."""
        stage = _KINDS[self.kind][0]
        if stage == "post" or (low_rank_mlp and self.kind in _HEAD_KINDS and self.layer < n_layers - 1):
            return (self.layer + 1, 0)
        return (self.layer, STAGES.index(stage))

    def entry_key(self) -> tuple:
        return (self.kind, self.layer, self.pos, self.src)


def _is_logit_diff(metric: Any) -> bool:
    return all(hasattr(metric, attr) for attr in ("end_idx", "io_ids", "s_ids", "from_answer_logits"))


def _get_activation(cache: Any, name: str) -> Tensor:
    try:
        return cache[name]
    except KeyError as err:
        raise KeyError(
            f"clean_cache has no {name!r}: cache it (e.g. model.run_with_cache(clean_tokens)) or pass "
            "clean_cache=None, clean_tokens=... to let the patching function cache what it needs"
        ) from err


class _Sweep:
    """Runs a list of patches with the fast engine and fills the output tensor."""

    def __init__(
        self,
        model,
        corrupted_tokens: Int[Tensor, "batch pos"],
        clean_cache: Any,
        metric: Any,
        *,
        clean_tokens: Tensor | None,
        positions: PositionsArg,
        batch_size: int | None,
        memory_budget_mb: float | None,
        progress: bool,
        device: torch.device | str | None,
        verify: bool,
        shared_prefix: bool,
        desc: str,
    ):
        if metric is None:
            raise TypeError("patching_metric is required")
        if clean_cache is None and clean_tokens is None:
            raise ValueError("pass clean_cache, or clean_cache=None together with clean_tokens=...")
        self.model = model
        self.device = torch.device(device) if device is not None else torch.device(model.cfg.device)
        self.out_device = torch.device(model.cfg.device)
        tokens = torch.as_tensor(corrupted_tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        self.tokens = tokens.to(self.device)
        self.clean_tokens = None if clean_tokens is None else torch.as_tensor(clean_tokens).to(self.device)
        if self.clean_tokens is not None and self.clean_tokens.ndim == 1:
            self.clean_tokens = self.clean_tokens[None]
        self.n_batch, self.n_pos = self.tokens.shape
        self.clean_cache = clean_cache
        self.metric = metric
        self.fast_ld = _is_logit_diff(metric)
        self.batch_size = batch_size
        self.memory_budget_mb = memory_budget_mb
        self.progress = progress
        self.verify = verify
        self.shared_prefix = shared_prefix
        self.desc = desc
        self.progress_bar: Any = None
        self._dz_memo: tuple | None = None
        self._mlp_memo_value: tuple | None = None
        self.net: NetWeights = net_weights(model, self.device)
        self.low_rank_mlp = not self.net.attn_only
        self.table, self.labels = position_table(positions, self.n_batch, self.n_pos, self.device)

    # -- setup --------------------------------------------------------------------------------

    def _clean(self, specs: Sequence[_Spec]) -> dict[str, Tensor]:
        """The clean activations the specs need (cached here from ``clean_tokens`` if no cache)."""
        names = sorted({_KINDS[s.kind][1].format(layer=s.layer) for s in specs})
        cache = self.clean_cache
        if cache is None:
            wanted = set(names)
            _, cache = self.model.run_with_cache(
                self.clean_tokens.to(self.out_device), names_filter=lambda n: n in wanted
            )
            self.clean_cache = cache
        acts = {name: _get_activation(cache, name).to(self.device, torch.float32) for name in names}
        if self.shared_prefix and self.clean_tokens is None and _EMBED_NAME not in acts:
            # to find the positions where clean and corrupted inputs agree (if the cache has it)
            try:
                acts[_EMBED_NAME] = cache[_EMBED_NAME].to(self.device, torch.float32)
            except (KeyError, IndexError):
                pass
        for name, act in acts.items():
            if act.shape[0] != self.n_batch:
                raise ValueError(
                    f"clean activation {name} has batch size {act.shape[0]}, but corrupted_tokens has "
                    f"{self.n_batch} prompts"
                )
        return acts

    def _check_metric(self) -> None:
        metric = self.metric
        if not self.fast_ld:
            return
        end = torch.as_tensor(metric.end_idx)
        if len(end) != self.n_batch:
            raise ValueError(f"the LogitDiff metric has {len(end)} prompts, the batch has {self.n_batch}")
        if int(end.max()) >= self.n_pos or int(end.min()) < 0:
            raise ValueError(f"END positions must lie in [0, {self.n_pos})")

    def _verify(self, corrupted: CorruptedRun, n_prompts: int = 8) -> None:
        """The re-implemented unpatched corrupted run must equal a forward of the model itself (on
        the first ``n_prompts`` prompts): the final residual stream at every position, and the
        logits at END (or at the last position for a generic metric)."""
        final_name = f"blocks.{self.net.n_layers - 1}.hook_resid_post"
        n = min(n_prompts, self.n_batch)
        logits, cache = self.model.run_with_cache(
            self.tokens[:n].to(self.out_device), names_filter=lambda name: name == final_name
        )
        rows = torch.arange(n, device=self.device)
        at = self.end_idx[:n] if self.fast_ld else torch.full_like(rows, self.n_pos - 1)
        pairs = [
            ("final residual stream", cache[final_name].to(self.device), corrupted.final[:n]),
            ("logits", logits.to(self.device)[rows, at], self.net.logits(corrupted.final[rows, at])),
        ]
        for what, ref, mine in pairs:
            err = float((ref - mine).abs().max())
            tol = 1e-3 + 1e-5 * float(ref.abs().max())
            if not err <= tol:
                raise RuntimeError(
                    f"fast activation patching: the re-implemented forward's {what} differs from the "
                    f"model's by {err:.3g} (> {tol:.3g}) on the unpatched corrupted run, so this model "
                    "variant is not reproduced exactly. Please report it; meanwhile use "
                    "transformer_lens.patching (or ioi.patching with verify=False at your own risk)."
                )

    # -- patched starting points --------------------------------------------------------------

    def _mask(self, entry: int | None) -> Tensor:
        """[batch, pos] bool: the positions a patch at position entry ``entry`` touches."""
        if entry is None:
            return torch.ones(self.n_batch, self.n_pos, dtype=torch.bool, device=self.device)
        mask = torch.zeros(self.n_batch, self.n_pos, dtype=torch.bool, device=self.device)
        mask[torch.arange(self.n_batch, device=self.device), self.table[entry]] = True
        return mask

    def _head_dz(self, kind: str, layer: int, pos: int | None, src: int | None, rowset: RowSet) -> Tensor:
        """``z_patched - z_corrupted`` at ``rowset``'s rows, ``[n_rows, n_heads, d_head]`` (memoised
        for the last key: consecutive chunks of a sweep share it)."""
        key = (kind, layer, pos, src)
        memo = self._dz_memo
        if memo is None or memo[0] != key or memo[1] is not rowset:
            dz = rowset.gather(self._head_z(kind, layer, pos, src) - self.corrupted.z[layer])
            self._dz_memo = memo = (key, rowset, dz)
        return memo[2]

    def _low_rank_mlp(self, layer: int) -> bool:
        return self.low_rank_mlp and layer < self.net.n_layers - 1

    def _mlp_memo(self, layer: int, rowset: RowSet) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s shared MLP input term at ``rowset``'s rows and its per-head factors."""
        memo = self._mlp_memo_value
        if memo is None or memo[0] != layer or memo[1] is not rowset:
            shared = self.net.mlp_in_shared(layer, rowset.gather(self.corrupted.resid_mid[layer]))
            factors = self.net.mlp_in_head_factors(layer)
            self._mlp_memo_value = memo = (layer, rowset, shared, factors)
        return memo[2], memo[3]

    def _head_z(self, kind: str, layer: int, pos: int | None, src: int | None) -> Tensor:
        """``z`` of layer ``layer`` (all heads) with ``kind`` of every head patched at ``pos``."""
        net, corr, clean = self.net, self.corrupted, self.clean_acts
        name = _KINDS[kind][1].format(layer=layer)
        z_corr = corr.z[layer]
        if kind == "z":
            return torch.where(self._mask(pos)[..., None, None], clean[name], z_corr)
        q, k, v = net.split_qkv(corr.qkv[layer])
        if kind in ("q", "k", "v"):
            mixed = torch.where(self._mask(pos)[..., None, None], clean[name], {"q": q, "k": k, "v": v}[kind])
            q, k, v = (mixed if kind == name_kind else t for name_kind, t in zip("qkv", (q, k, v)))
            z, _ = net.attention(layer, q, k, v)
            return z
        # pattern / pattern_src: [batch, head, dest, src]
        pattern = causal_pattern(q.transpose(1, 2), k.transpose(1, 2), net.attn_scales[layer])
        if kind == "pattern":
            mask = self._mask(pos)[:, None, :, None]
        else:
            rows = torch.arange(self.n_batch, device=self.device)
            mask = torch.zeros_like(pattern, dtype=torch.bool)
            mask[rows, :, self.table[pos], self.table[src]] = True
        pattern = torch.where(mask, clean[name], pattern)
        return (pattern @ v.transpose(1, 2)).transpose(1, 2)

    def _rows_maker(self, specs: Sequence[_Spec], rowset: RowSet) -> Callable[[], Tensor]:
        """A function returning the patched streams ``[len(specs), n_rows, d_model]`` at their stage."""
        first = specs[0]
        kind, layer, pos = first.kind, first.layer, first.pos
        net, corr, clean = self.net, self.corrupted, self.clean_acts
        name = _KINDS[kind][1].format(layer=layer)

        if kind in _HEAD_KINDS:
            heads = [s.head for s in specs]

            low_rank = self._low_rank_mlp(layer)

            def make_heads() -> Tensor:
                dz = self._head_dz(kind, layer, pos, first.src, rowset)[:, heads]  # [rows, k, d_head]
                delta = torch.einsum("rkd,kdm->krm", dz, net.W_O[layer][heads])
                x = rowset.gather(corr.resid_mid[layer])[None] + delta  # resid_mid, patched
                if not low_rank:
                    return x
                shared, factors = self._mlp_memo(layer, rowset)
                return net.add_mlp_low_rank_(layer, x, shared, torch.einsum("rkd,kdm->krm", dz, factors[heads]))

            return make_heads

        assert len(specs) == 1

        def make_resid() -> Tensor:
            rows = torch.arange(self.n_batch, device=self.device)
            at = self.table[pos]
            if kind in ("resid_pre", "resid_mid"):
                full = (corr.resid[layer] if kind == "resid_pre" else corr.resid_mid[layer]).clone()
                full[rows, at] = clean[name][rows, at]
            elif kind == "attn_out":
                full = corr.resid_mid[layer].clone()
                full[rows, at] = corr.resid[layer][rows, at] + clean[name][rows, at]
            else:  # mlp_out
                full = corr.resid[layer + 1].clone()
                full[rows, at] = corr.resid_mid[layer][rows, at] + clean[name][rows, at]
            return rowset.gather(full)[None]

        return make_resid

    # -- metric -------------------------------------------------------------------------------

    def _values_ld(self, final: Tensor, rowset: RowSet) -> Tensor:
        """Metric values of ``K`` final streams at END rows ``[K, n_active, d]``."""
        active = rowset.active
        io, s = self.net.answer_logits(final, self.io_ids[active], self.s_ids[active])
        k = final.shape[0]
        io_all = self.base_io.expand(k, -1).clone()
        s_all = self.base_s.expand(k, -1).clone()
        io_all[:, active] = io
        s_all[:, active] = s
        return torch.as_tensor(self.metric.from_answer_logits(io_all, s_all)).reshape(k, *self.value_shape)

    def _values_generic(self, final: Tensor | None, rowset: RowSet | None) -> Tensor:
        """Metric values of ``K`` final streams at ``rowset``'s rows (None: the unpatched run)."""
        corr_final = self.corrupted.final
        if final is None:
            streams = corr_final[None]
        else:
            flat = corr_final.reshape(1, self.n_batch * self.n_pos, -1).expand(final.shape[0], -1, -1).clone()
            flat.index_copy_(1, rowset.rows, final)
            streams = flat.view(final.shape[0], self.n_batch, self.n_pos, -1)
        values = []
        for stream in streams:
            out = torch.as_tensor(self.metric(self.net.logits(stream)))
            values.append(out.detach().to(self.device, torch.float32))
        return torch.stack(values)

    # -- main loop ----------------------------------------------------------------------------

    def run(self, specs: Sequence[_Spec], out_shape: tuple[int, ...]) -> Tensor:
        net = self.net
        self._check_metric()
        self.clean_acts = self._clean(specs)
        keep_z = any(s.kind in _HEAD_KINDS for s in specs)
        self.corrupted = CorruptedRun.run(net, self.tokens, keep_z=keep_z)

        if self.fast_ld:
            m = self.metric
            self.end_idx = torch.as_tensor(m.end_idx).to(self.device).long()
            self.io_ids = torch.as_tensor(m.io_ids).to(self.device).long()
            self.s_ids = torch.as_tensor(m.s_ids).to(self.device).long()
            rows = torch.arange(self.n_batch, device=self.device)
            base_final = self.corrupted.final[rows, self.end_idx]
            base_io, base_s = net.answer_logits(base_final, self.io_ids, self.s_ids)
            self.base_io, self.base_s = base_io[None], base_s[None]
            baseline = torch.as_tensor(m.from_answer_logits(self.base_io, self.base_s))
            self.value_shape = tuple(baseline.shape[1:])
            baseline = baseline.reshape(self.value_shape)
            stop = self.end_idx
        else:
            baseline = self._values_generic(None, None)[0]
            self.value_shape = tuple(baseline.shape)
            stop = torch.full((self.n_batch,), self.n_pos - 1, dtype=torch.long, device=self.device)
        if self.verify:
            self._verify(self.corrupted)

        if self.shared_prefix:
            first_diff = shared_prefix_lengths(
                self.clean_tokens, self.tokens, self.clean_acts.get(_EMBED_NAME),
                self.corrupted.resid[0],
            )
        else:
            first_diff = torch.zeros(self.n_batch, dtype=torch.long, device=self.device)

        out = torch.zeros(out_shape + self.value_shape, device=self.device, dtype=torch.float32)
        groups: dict[int | None, list[_Spec]] = defaultdict(list)
        for spec in specs:
            groups[spec.pos].append(spec)

        for pos, group in groups.items():
            if pos is None:
                start = first_diff
            else:
                at = self.table[pos]
                start = torch.where(at >= first_diff, at, stop + 1)
            rowset = RowSet.build(start, stop, self.n_pos)
            if rowset.n_rows == 0:
                for spec in group:
                    out[spec.out] = baseline
                self._tick(len(group))
                continue
            self._run_group(group, rowset, out)
        return out.to(self.out_device)

    def _run_group(self, group: list[_Spec], rowset: RowSet, out: Tensor) -> None:
        net = self.net
        group = sorted(
            group,
            key=lambda s: (*s.resume_point(net.n_layers, self.low_rank_mlp), _KIND_ORDER[s.kind], s.src or 0,
                           s.layer, s.head or 0),
        )
        per_patch = bytes_per_patch(
            n_rows=rowset.n_rows, n_batch=self.n_batch, n_pos=self.n_pos, d_model=net.d_model,
            n_heads=net.n_heads, d_head=net.d_head, d_mlp=net.d_mlp,
        )
        k_max = chunk_size(
            batch_size=self.batch_size, memory_budget_mb=self.memory_budget_mb,
            device=self.device, per_patch_bytes=per_patch, rows_per_patch=rowset.n_rows,
        )
        resume = ResumeForward(net, self.corrupted, rowset, end_only=self.fast_ld)
        for start in range(0, len(group), k_max):
            chunk = group[start : start + k_max]
            entries: list[Entry] = []
            i = 0
            while i < len(chunk):
                j = i + 1
                if chunk[i].kind in _HEAD_KINDS:
                    while j < len(chunk) and chunk[j].entry_key() == chunk[i].entry_key():
                        j += 1
                layer, stage_idx = chunk[i].resume_point(net.n_layers, self.low_rank_mlp)
                entries.append(
                    Entry(layer=layer, stage=STAGES[stage_idx], k=j - i,
                          make_rows=self._rows_maker(chunk[i:j], rowset))
                )
                i = j
            final = resume.run(entries)
            values = self._values_ld(final, rowset) if self.fast_ld else self._values_generic(final, rowset)
            for spec, value in zip(chunk, values):
                out[spec.out] = value
            self._tick(len(chunk))

    def _tick(self, n: int) -> None:
        if self.progress_bar is not None:
            self.progress_bar.update(n)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _run(
    tl_name: str,
    model,
    corrupted_tokens,
    clean_cache,
    patching_metric,
    build: Callable[[int, int, int], tuple[list[_Spec], tuple[int, ...]]],
    options: dict[str, Any],
) -> Tensor:
    """Shared driver: build specs for (n_layers, n_heads, n_entries), run them, fall back if needed."""
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"{tl_name}() got unexpected keyword argument(s) {sorted(unknown)}")
    opts = {**_OPTION_DEFAULTS, **options}
    if patching_metric is None:
        raise TypeError(f"{tl_name}() needs patching_metric")
    reason = unsupported_reason(model)
    if reason is not None:
        return _fallback(tl_name, reason, model, corrupted_tokens, clean_cache, patching_metric, opts)
    with torch.inference_mode():
        sweep = _Sweep(model, corrupted_tokens, clean_cache, patching_metric, desc=tl_name, **opts)
        specs, shape = build(model.cfg.n_layers, model.cfg.n_heads, sweep.table.shape[0])
        bar = tqdm(total=len(specs), desc=tl_name, disable=not opts["progress"])
        sweep.progress_bar = bar
        try:
            result = sweep.run(specs, shape)
        finally:
            bar.close()
    return result.clone()  # a normal tensor (not an inference-mode one), like TL's


def _fallback(tl_name, reason, model, corrupted_tokens, clean_cache, metric, opts) -> Tensor:
    if opts["positions"] is not None:
        raise NotImplementedError(f"positions= needs the fast path, which cannot run here: {reason}")
    if clean_cache is None:
        _, clean_cache = model.run_with_cache(opts["clean_tokens"])
    warnings.warn(
        f"{tl_name}: the fast path does not support this model ({reason}); using "
        "transformer_lens.patching (slow, one full forward per patch).",
        stacklevel=3,
    )
    from transformer_lens import patching as tl_patching

    with torch.no_grad():
        return getattr(tl_patching, tl_name)(model, corrupted_tokens, clean_cache, metric)


_OPTION_DEFAULTS: dict[str, Any] = {
    "clean_tokens": None,
    "positions": None,
    "batch_size": None,
    "memory_budget_mb": None,
    "progress": True,
    "device": None,
    "verify": True,
    "shared_prefix": True,
}
_OPTION_NAMES = set(_OPTION_DEFAULTS)


def _layer_pos(kinds: Sequence[str], stacked: bool):
    def build(n_layers: int, n_heads: int, n_entries: int):
        specs = [
            _Spec(kind, layer, None, pos, None, ((t,) if stacked else ()) + (layer, pos))
            for t, kind in enumerate(kinds)
            for layer in range(n_layers)
            for pos in range(n_entries)
        ]
        shape = ((len(kinds),) if stacked else ()) + (n_layers, n_entries)
        return specs, shape

    return build


def _layer_head(kinds: Sequence[str], stacked: bool):
    def build(n_layers: int, n_heads: int, n_entries: int):
        specs = [
            _Spec(kind, layer, head, None, None, ((t,) if stacked else ()) + (layer, head))
            for t, kind in enumerate(kinds)
            for layer in range(n_layers)
            for head in range(n_heads)
        ]
        shape = ((len(kinds),) if stacked else ()) + (n_layers, n_heads)
        return specs, shape

    return build


def _layer_pos_head(kinds: Sequence[str], stacked: bool, pattern_head_first: bool):
    """[layer, pos, head] cells; a lone pattern sweep uses TL's [layer, head, dest_pos] order."""

    def build(n_layers: int, n_heads: int, n_entries: int):
        specs = []
        for t, kind in enumerate(kinds):
            for layer in range(n_layers):
                for pos in range(n_entries):
                    for head in range(n_heads):
                        if kind == "pattern" and pattern_head_first:
                            cell = (layer, head, pos)
                        else:
                            cell = (layer, pos, head)
                        specs.append(_Spec(kind, layer, head, pos, None, ((t,) if stacked else ()) + cell))
        if pattern_head_first:
            shape = (n_layers, n_heads, n_entries)
        else:
            shape = ((len(kinds),) if stacked else ()) + (n_layers, n_entries, n_heads)
        return specs, shape

    return build


def _dest_src(n_layers: int, n_heads: int, n_entries: int):
    specs = [
        _Spec("pattern_src", layer, head, dest, src, (layer, head, dest, src))
        for layer in range(n_layers)
        for head in range(n_heads)
        for dest in range(n_entries)
        for src in range(n_entries)
    ]
    return specs, (n_layers, n_heads, n_entries, n_entries)


_DOC_OPTIONS = """
    Args:
        model: a GPT-2-style ``TransformerBridge`` (compatibility mode), e.g. from
            :func:`ioi.models.load_model`; other architectures fall back to TransformerLens.
        corrupted_tokens: ``[batch, pos]`` tokens of the run that is patched into.
        clean_cache: activations of the clean run (an ``ActivationCache`` or a dict by hook name),
            aligned with ``corrupted_tokens``; or ``None`` together with ``clean_tokens=``.
        patching_metric: an :class:`ioi.metrics.LogitDiff` (fast: END rows and the IO/S logits
            only) or any callable on full logits ``[batch, pos, d_vocab]`` returning a scalar (or a
            fixed-shape tensor, which becomes trailing output axes).
        clean_tokens: clean ``[batch, pos]`` tokens; used to cache the needed clean activations
            when ``clean_cache`` is None and to find where clean and corrupted inputs differ.
        positions: the position axis (default every position, like TL): absolute positions
            (ints), or per-prompt positions (``{"IO": LongTensor[batch], ...}`` or a
            ``[n_entries, batch]`` tensor); the output's position axis follows that order.
        batch_size: patches per batched pass (default: from ``memory_budget_mb``).
        memory_budget_mb: activation memory for one batched pass (default 1024 on CPU, 4096 GPU).
        progress: show a tqdm bar.
        device: where the computation runs (default the model's device); the result is returned
            on ``model.cfg.device``.
        verify: check the re-implemented forward against one bridge forward on the corrupted
            tokens first (about one TL patch's cost).
        shared_prefix: treat leading positions where clean and corrupted inputs are identical as
            unchanged by any patch (exact: causal attention).
"""


def _make(tl_name: str, build, shape_doc: str, what: str):
    def fn(
        model,
        corrupted_tokens: Int[Tensor, "batch pos"],
        clean_cache: Any = None,
        patching_metric: PatchingMetric | None = None,
        **options: Any,
    ) -> Tensor:
        if "metric" in options and patching_metric is None:  # TL's *_every helpers call it ``metric``
            patching_metric = options.pop("metric")
        corrupted_tokens = check_tokens(model, corrupted_tokens, "corrupted_tokens")
        if options.get("clean_tokens") is not None:
            options["clean_tokens"] = check_tokens(model, options["clean_tokens"], "clean_tokens")
        return _run(tl_name, model, corrupted_tokens, clean_cache, patching_metric, build, options)

    fn.__name__ = fn.__qualname__ = tl_name
    fn.__doc__ = (
        f"{what}\n\n    Returns a float tensor of shape ``{shape_doc}`` (same as\n"
        f"    ``transformer_lens.patching.{tl_name}``): each cell is ``patching_metric`` of the\n"
        "    corrupted run with that one clean activation patched in.\n" + _DOC_OPTIONS
    )
    fn.__annotations__["return"] = f"Float[Tensor, '{shape_doc.strip('[]').replace(',', '')}']"
    return fn


get_act_patch_resid_pre = _make(
    "get_act_patch_resid_pre", _layer_pos(["resid_pre"], False), "[n_layers, pos]",
    "Patch the clean residual stream entering block ``layer`` (``blocks.L.hook_resid_pre``) at one\n"
    "    position into the corrupted run, for every (layer, position).",
)
get_act_patch_resid_mid = _make(
    "get_act_patch_resid_mid", _layer_pos(["resid_mid"], False), "[n_layers, pos]",
    "Patch the clean residual stream between attention and MLP (``blocks.L.hook_resid_mid``) at one\n"
    "    position into the corrupted run, for every (layer, position).",
)
get_act_patch_attn_out = _make(
    "get_act_patch_attn_out", _layer_pos(["attn_out"], False), "[n_layers, pos]",
    "Patch the clean output of attention layer ``L`` (``blocks.L.hook_attn_out``, all heads + b_O)\n"
    "    at one position into the corrupted run, for every (layer, position).",
)
get_act_patch_mlp_out = _make(
    "get_act_patch_mlp_out", _layer_pos(["mlp_out"], False), "[n_layers, pos]",
    "Patch the clean output of MLP ``L`` (``blocks.L.hook_mlp_out``) at one position into the\n"
    "    corrupted run, for every (layer, position).",
)
get_act_patch_block_every = _make(
    "get_act_patch_block_every", _layer_pos(["resid_pre", "attn_out", "mlp_out"], True),
    "[3, n_layers, pos]",
    "``resid_pre``, ``attn_out`` and ``mlp_out`` patching (each one location at a time), stacked in\n"
    "    that order.",
)
get_act_patch_attn_head_out_all_pos = _make(
    "get_act_patch_attn_head_out_all_pos", _layer_head(["z"], False), "[n_layers, n_heads]",
    "Patch the clean output ``z`` of one head (``blocks.L.attn.hook_z[:, :, head]``) at every\n"
    "    position into the corrupted run, for every (layer, head).",
)
get_act_patch_attn_head_q_all_pos = _make(
    "get_act_patch_attn_head_q_all_pos", _layer_head(["q"], False), "[n_layers, n_heads]",
    "Patch the clean queries of one head (``blocks.L.attn.hook_q[:, :, head]``) at every position\n"
    "    into the corrupted run (keys and values stay corrupted), for every (layer, head).",
)
get_act_patch_attn_head_k_all_pos = _make(
    "get_act_patch_attn_head_k_all_pos", _layer_head(["k"], False), "[n_layers, n_heads]",
    "Patch the clean keys of one head (``blocks.L.attn.hook_k[:, :, head]``) at every position into\n"
    "    the corrupted run, for every (layer, head).",
)
get_act_patch_attn_head_v_all_pos = _make(
    "get_act_patch_attn_head_v_all_pos", _layer_head(["v"], False), "[n_layers, n_heads]",
    "Patch the clean values of one head (``blocks.L.attn.hook_v[:, :, head]``) at every position\n"
    "    into the corrupted run, for every (layer, head).",
)
get_act_patch_attn_head_pattern_all_pos = _make(
    "get_act_patch_attn_head_pattern_all_pos", _layer_head(["pattern"], False), "[n_layers, n_heads]",
    "Patch the clean attention pattern of one head (``blocks.L.attn.hook_pattern[:, head]``, every\n"
    "    destination and source) into the corrupted run, for every (layer, head).",
)
get_act_patch_attn_head_all_pos_every = _make(
    "get_act_patch_attn_head_all_pos_every", _layer_head(["z", "q", "k", "v", "pattern"], True),
    "[5, n_layers, n_heads]",
    "All-position head patching of output ``z``, queries, keys, values and pattern (each one\n"
    "    location at a time), stacked in that order.",
)
get_act_patch_attn_head_out_by_pos = _make(
    "get_act_patch_attn_head_out_by_pos", _layer_pos_head(["z"], False, False), "[n_layers, pos, n_heads]",
    "Patch the clean output ``z`` of one head at one position (``hook_z[:, pos, head]``) into the\n"
    "    corrupted run, for every (layer, position, head).",
)
get_act_patch_attn_head_q_by_pos = _make(
    "get_act_patch_attn_head_q_by_pos", _layer_pos_head(["q"], False, False), "[n_layers, pos, n_heads]",
    "Patch the clean query of one head at one position (``hook_q[:, pos, head]``) into the\n"
    "    corrupted run, for every (layer, position, head).",
)
get_act_patch_attn_head_k_by_pos = _make(
    "get_act_patch_attn_head_k_by_pos", _layer_pos_head(["k"], False, False), "[n_layers, pos, n_heads]",
    "Patch the clean key of one head at one position (``hook_k[:, pos, head]``) into the corrupted\n"
    "    run, for every (layer, position, head).",
)
get_act_patch_attn_head_v_by_pos = _make(
    "get_act_patch_attn_head_v_by_pos", _layer_pos_head(["v"], False, False), "[n_layers, pos, n_heads]",
    "Patch the clean value of one head at one position (``hook_v[:, pos, head]``) into the\n"
    "    corrupted run, for every (layer, position, head).",
)
get_act_patch_attn_head_pattern_by_pos = _make(
    "get_act_patch_attn_head_pattern_by_pos", _layer_pos_head(["pattern"], False, True),
    "[n_layers, n_heads, pos]",
    "Patch the clean attention pattern row of one head at one destination position\n"
    "    (``hook_pattern[:, head, dest_pos, :]``) into the corrupted run, for every (layer, head,\n"
    "    dest_pos). Note TL's axis order: head before position.",
)
get_act_patch_attn_head_pattern_dest_src_pos = _make(
    "get_act_patch_attn_head_pattern_dest_src_pos", _dest_src, "[n_layers, n_heads, pos, pos]",
    "Patch one clean attention-pattern entry (``hook_pattern[:, head, dest_pos, src_pos]``) into\n"
    "    the corrupted run, for every (layer, head, dest_pos, src_pos); ``positions=`` restricts both\n"
    "    position axes.",
)
get_act_patch_attn_head_by_pos_every = _make(
    "get_act_patch_attn_head_by_pos_every", _layer_pos_head(["z", "q", "k", "v", "pattern"], True, False),
    "[5, n_layers, pos, n_heads]",
    "By-position head patching of output ``z``, queries, keys, values and pattern (destination\n"
    "    position), stacked in that order; the pattern sweep is laid out [layer, pos, head] here, as in\n"
    "    TL.",
)
